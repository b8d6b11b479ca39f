"""Training: one loop (loop.py) for every method; each method is an Objective.

    sft.py       stage 0: CoT-SFT (teacher and baseline) and No-CoT SFT
    stage1.py    stage 1: language-to-latent self-distillation
    baselines.py pause tokens and the Coconut curriculum
    stage2.py    stage 2: full latent path to the shortcut path
"""

from .baselines import Coconut, Pause
from .objective import Objective
from .sft import CoTSFT, NoCoTSFT
from .stage1 import LatentDistillation
from .stage2 import ShortcutDistillation

# a method's name (config.METHODS) -> its Objective; the one place that knows every method
METHOD_CLASSES: dict[str, type[Objective]] = {
    "cot": CoTSFT, "nocot": NoCoTSFT, "pause": Pause, "coconut": Coconut,
    "latent": LatentDistillation, "system15": ShortcutDistillation,
}


def objective_class(method: str) -> type[Objective]:
    if method not in METHOD_CLASSES:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHOD_CLASSES)}")
    return METHOD_CLASSES[method]


def objective_for(method: str, config) -> Objective:
    return objective_class(method)(config)


__all__ = ["METHOD_CLASSES", "Objective", "objective_class", "objective_for"]
