"""The GSM8K ladder in miniature (configs/gsm8k_smoke.yaml): real GSM8K lines, the real
SmolLM2 GGUF (first 2 layers), every rung for a few steps on CPU. Checks the table's shape
and that every number is finite; it proves the plumbing, not accuracy."""

import json
import math

from system15.config import METHODS, load_config
from system15.recipes.ladder import run_ladder

from tests.helpers import DATA_ROOT, ROOT


def test_gsm8k_smoke_recipe_runs_the_whole_ladder(tmp_path):
    config = load_config(ROOT / "configs" / "gsm8k_smoke.yaml", [f"task.data_root={DATA_ROOT}"])
    summary = run_ladder(config, runs_root=tmp_path / "runs", results_root=tmp_path / "results",
                         command="system15 bench --recipe configs/gsm8k_smoke.yaml")
    saved = json.loads((tmp_path / "results" / "gsm8k_smoke" / "summary.json").read_text())
    assert saved["task"] == "gsm8k" and saved["backbone"] == "smollm2"
    assert [r["method"] for r in saved["rows"]] == list(METHODS)
    for row in saved["rows"]:
        numbers = [n for k, v in row.items() if k != "method" for n in _numbers(v)]
        assert numbers and all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers), row
        assert row["valid_curve"], row  # each rung evaluated on validation at least once
    assert len(summary["sweep"]) == 1
    assert (tmp_path / "results" / "gsm8k_smoke" / "pareto.png").exists()


def _numbers(value) -> list:
    """The numbers in a row's value: itself, or every item of a list (the validation curve)."""
    return [n for item in value for n in _numbers(item)] if isinstance(value, list) else [value]
