"""How many operations each training step launches, per method: on a GPU these steps are
launch-bound (results/gsm8k_smollm2/README.md), so the count predicts their cost better than
FLOPs do. Counted on the CPU with torch.profiler (top-level ops of one forward and backward
at batch 8; on CUDA each is one or more kernel launches). Writes results/gsm8k_smollm2/step_ops.json.

    python recipes/gsm8k_gpu/step_ops.py configs/gsm8k_smollm2.yaml
"""

import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from system15.config import METHODS, load_config
from system15.data import load_splits
from system15.layout import encode
from system15.model import build_model
from system15.train import objective_for

config = load_config(sys.argv[1], ["device=cpu"])
splits = load_splits(config)
model = build_model(config, [e.text for e in splits["train"]])
examples = [encode(model.tokenizer, e) for e in splits["train"][:8]]
counts = {}
for method in METHODS:  # system15 last: its prepare freezes the backbone
    objective = objective_for(method, config)
    objective.prepare(model)
    objective.on_step(config.stage(method).steps - 1, config.stage(method).steps)  # Coconut: its last stage
    batch = objective.collate(model, examples)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss, _ = model(objective, batch)
        loss.backward()
    counts[method] = sum(1 for e in prof.events() if e.cpu_parent is None)
    print(f"{method}: {counts[method]} ops", file=sys.stderr)
out = Path(__file__).resolve().parents[2] / "results" / "gsm8k_smollm2" / "step_ops.json"
out.write_text(json.dumps({"recipe": sys.argv[1], "batch": len(examples), "layers": model.num_layers,
                           "torch": torch.__version__, "top_level_ops_per_training_step": counts}, indent=2) + "\n")
