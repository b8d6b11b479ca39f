"""Fit the GSM8K ladder into one GPU lease (30 device-minutes, of which ~20 for the ladder).

Times training steps of the three objectives whose cost differs (CoT-SFT, stage-1 latent,
stage-2 System-1.5) on the real backbone, then prints the `stages.<m>.*` overrides that give
each rung its share of the wall-clock budget. run.sh hands them to `system15 bench`;
summary.json records them (results/gsm8k_smollm2/).

The clock, not the estimate, ends a rung: a timing this short is dominated by warm-up and can
read a step at several times its steady cost (results/gsm8k_smollm2/README.md has a lease
where CoT stopped at half its budget that way). So every rung but Coconut gets `max_minutes` = its budget with `decay_by=budget` (the learning rate
anneals over the clock), and twice the estimated steps (at most MAX_EPOCHS passes over the
training set). The estimate still spaces warm-up and validation, and sets Coconut's steps: a
capped Coconut would stop before its curriculum ends.

    python recipes/gpu_lease/plan.py configs/gsm8k_smollm2.yaml
"""

import dataclasses
import sys
import tempfile

from system15.config import load_config
from system15.layout import encode
from system15.model import build_model
from system15.data import load_splits
from system15.runtime import accelerator_for, device_for
from system15.train import objective_for
from system15.train.loop import fit

SECONDS = {"cot": 180, "nocot": 40, "pause": 40, "coconut": 80, "latent": 180, "system15": 80}  # 10 of the ~20 minutes
TIMED_AS = {"cot": "cot", "nocot": "cot", "pause": "cot", "coconut": "latent", "latent": "latent", "system15": "system15"}
MAX_EPOCHS = 8
RESOLUTION = 0.1  # the least that four steps are taken to cost: a tiny model's can read next to 0

config = load_config(sys.argv[1], [])
splits = load_splits(config)
model = build_model(config, [e.text for e in splits["train"]]).to(device_for(config))
encoded = [encode(model.tokenizer, e) for e in splits["train"][:1024]]
step_seconds = {}
for method in ("cot", "latent", "system15"):
    objective = objective_for(method, config)
    with tempfile.TemporaryDirectory() as run_dir:
        seconds = [fit(model, objective, encoded, dataclasses.replace(config.stage(method), steps=steps, eval_every=10**6),
                       run_dir, accelerator=accelerator_for(config), quiet=True)["seconds"] for steps in (2, 6)]
    # the second fit resumes the first: the difference is steps 3 to 6, past the first steps' warm-up
    step_seconds[method] = max(seconds[1] - seconds[0], RESOLUTION) / 4
    print(f"# {method}: {step_seconds[method]:.3f} s/step", file=sys.stderr)
overrides = []
for method, budget in SECONDS.items():
    stage = config.stage(method)
    epoch = len(splits["train"]) / stage.batch_size
    cap = int(MAX_EPOCHS * epoch)
    estimate = max(20, min(int(budget / step_seconds[TIMED_AS[method]]), cap))
    capped = method != "coconut"
    steps = max(estimate, min(2 * estimate, cap)) if capped else estimate
    overrides += [f"stages.{method}.steps={steps}", f"stages.{method}.warmup={estimate // 20}",
                  f"stages.{method}.eval_every={max(1, estimate // 2)}"]
    if capped:
        overrides += [f"stages.{method}.max_minutes={budget / 60:.2f}", f"stages.{method}.decay_by=budget"]
print(" ".join(overrides))
