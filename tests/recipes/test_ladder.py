"""The ladder (recipes/ladder.py), in miniature: every rung trains, the table and figures are
written (the `ladder` fixture, tests/conftest.py, trains it once per session)."""

import json
import math

import pytest

from system15.config import METHODS


def test_summary_has_every_method_and_finite_numbers(ladder):
    root, _, summary = ladder
    on_disk = json.loads((root / "results" / "tiny" / "summary.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(summary["rows"]))
    assert {"task", "backbone", "device", "command", "rows"} <= set(on_disk)
    assert [r["method"] for r in on_disk["rows"]] == list(METHODS)
    for row in on_disk["rows"]:
        for key in ("accuracy", "decoding_steps", "flops_per_step", "latency_ms", "speedup_vs_cot"):
            assert math.isfinite(row[key]), (row["method"], key)
        assert 0.0 <= row["accuracy"] <= 1.0
    s15 = next(r for r in on_disk["rows"] if r["method"] == "system15")
    for key in ("flops_reduction_vs_latent", "skip_frac_critical", "skip_frac_noncritical",
                "speedup_vs_cot_b4", "latency_vs_nocot"):
        assert math.isfinite(s15[key]), key
    assert set(on_disk["stage1_align"]) == {"segment", "codi", "chosen"}


def test_system15_latency_is_taken_apart(ladder):
    root, config, summary = ladder
    parts = summary["system15_latency_parts"]
    for key in ("prefill_us", "full_layer_us", "router_us", "adapters_us", "kv_fill_us", "step_outside_layers_us"):
        assert 0 < parts[key] < 1e6, key
    s15 = next(r for r in summary["rows"] if r["method"] == "system15")
    assert parts["forwards_per_example"] == s15["forwards_per_example"] >= config.architecture.K + 1
    assert 0 <= parts["layers_run_per_example"] <= parts["forwards_per_example"] * config.backbone.n_layer
    assert parts["rebuilt_ms"] > 0 and parts["measured_ms"] == s15["latency_ms"]
    assert parts["cot_rebuilt_ms"] * 1000 > parts["prefill_us"]  # CoT rebuilt from the same parts, chain included
    # the bound that keeps critical steps' layers: their count is the records', and with
    # fewer layers than every visited one it beats CoT rebuilt with every layer run
    critical = parts["critical_layers_per_example"]
    assert critical == s15["critical_layers_per_example"]
    assert 0 < critical < parts["forwards_per_example"] * config.backbone.n_layer
    floor_us = parts["prefill_us"] + parts["forwards_per_example"] * parts["step_outside_layers_us"] + critical * parts["full_layer_us"]
    assert parts["speedup_vs_cot_if_only_critical_layers_ran"] == pytest.approx(parts["cot_rebuilt_ms"] * 1000 / floor_us, rel=1e-3)  # parts are kept to 0.1 µs
    md = (root / "results" / "tiny" / "summary.md").read_text()
    assert "rebuilt from its parts" in md and "critical steps ran all of theirs" in md
    assert "Against the bars set for the default task" in md


def test_markdown_and_figures_are_written(ladder):
    root, _, summary = ladder
    out = root / "results" / "tiny"
    table = (out / "summary.md").read_text()
    assert "| system15 |" in table and "| cot |" in table
    for name in ("sweep_heatmap.png", "pareto.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(summary["sweep"]) == 4


def test_decoding_steps_follow_the_method(ladder):
    _, config, summary = ladder
    rows = {r["method"]: r for r in summary["rows"]}
    K = config.architecture.K
    # thought methods decode their K thoughts plus at least one answer token; the budget caps the tokens
    budget = config.task.max_new_tokens
    for method, k in (("latent", K), ("system15", K), ("pause", config.baselines.pause_K), ("nocot", 0)):
        assert k + 1 <= rows[method]["decoding_steps"] <= k + budget, method
    assert 1 <= rows["cot"]["decoding_steps"] <= budget
