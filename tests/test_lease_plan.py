"""recipes/gpu_lease/plan.py fits the GSM8K ladder into a GPU lease. A break in it costs
a lease, so it runs here on a tiny recipe: its overrides must load, cover every rung, and let
the clock end every rung but Coconut with its learning rate annealed."""

import subprocess
import sys

from system15.config import METHODS, load_config

from conftest import ROOT

RECIPE = """name: tiny
task: {name: synthetic, n_steps: 3, n_train: 64, n_valid: 4, n_test: 4, max_new_tokens: 12}
backbone: {n_layer: 2, n_embd: 32, n_head: 4}
latent: {probe: 1.0, probe_results: last}
stages:
""" + "".join(f"  {m}: {{batch_size: 8}}\n" for m in METHODS)


def test_plan_writes_overrides_that_load_for_every_rung(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    done = subprocess.run([sys.executable, str(ROOT / "recipes" / "gpu_lease" / "plan.py"), str(recipe)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    overrides = done.stdout.split()
    timed = {line.split(":")[0][2:] for line in done.stderr.splitlines() if line.startswith("# ")}
    assert timed == {"cot", "latent", "system15"}
    config = load_config(recipe, overrides)
    for method in METHODS:
        stage = config.stage(method)
        assert stage.steps >= 20 and 1 <= stage.eval_every <= stage.steps and stage.warmup <= stage.steps // 20
        capped = method != "coconut"  # a capped Coconut would not finish its curriculum
        assert (stage.max_minutes is not None) == capped
        assert stage.decay_by == ("budget" if capped else "steps")  # the clock ends a capped rung annealed
