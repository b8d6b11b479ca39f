"""Training: one loop (loop.py) for every method; each method is an Objective.

    sft.py       stage 0: CoT-SFT (teacher and baseline) and No-CoT SFT
    stage1.py    stage 1: language-to-latent self-distillation
    baselines.py pause tokens and the Coconut curriculum
    stage2.py    stage 2: full latent path to the shortcut path
"""

from .objective import Objective, objective_class, objective_for

__all__ = ["Objective", "objective_class", "objective_for"]
