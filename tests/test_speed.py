"""`system15 speed`: the benchmark's results have the promised shape, its FLOP predictions are
those of flops.FlopCounter, and a forced skip mask is obeyed. No duration or speedup is asserted."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from tests.helpers import tiny_config, tiny_model

from system15.cli import main
from system15.engine import FULL, Route, generate
from system15.flops import FlopCounter
from system15.layout import encode, prompt
from system15.model import build_model
from system15.speed import (
    FRACTIONS,
    PATTERNS,
    Config,
    Start,
    _in_turn,
    _paired,
    _quartiles,
    decode,
    efficiency,
    hf_generate,
    profile_step,
    run_speed,
    skip_mask,
    skipped_count,
)

PROMPT = "a=3,b=4,c=a+b. c?"
LAYERS = 4  # so that each skip fraction 0, 1/4, ... 1 skips a different number of layers
ROW_KEYS = {"backbone", "batch_size", "pattern", "skip_fraction", "latency_ms", "full_latency_ms", "speedup",
            "ideal_speedup", "efficiency"}


def speed_config(family, **overrides):
    return tiny_config(family, **{"backbone.n_layer": LAYERS, "name": "speed", **overrides})


def randomise_routers(model, seed=0):
    """Routers with varied decisions (untrained ones never skip), so that a forced mask differs from them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.shortcuts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def summary(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"speed-{request.param}")
    result = run_speed(speed_config(request.param), batch_sizes=[1, 2], steps=3, rounds=1, results_root=out,
                       prompt=PROMPT, profile=False, quiet=True, command="system15 speed (test)")
    return result, out / "speed"


def test_the_summary_has_every_row_and_key(summary):
    result, out = summary
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(result))
    assert (out / "summary.md").read_text().startswith("# speed")
    assert (out / "speedup.png").stat().st_size > 0
    for key in ("rows", "hf_generate_ratio", "device", "command", "settings", "targets"):
        assert key in result
    rows = result["rows"]
    assert len(rows) == 2 * len(PATTERNS) * len(FRACTIONS)
    assert {(r["batch_size"], r["pattern"], r["skip_fraction"]) for r in rows} == \
        {(b, p, f) for b in (1, 2) for p in PATTERNS for f in FRACTIONS}
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert r["latency_ms"] > 0 and r["full_latency_ms"] > 0
        assert r["speedup"] == pytest.approx(r["full_latency_ms"] / r["latency_ms"])
        assert r["layers_skipped"] == skipped_count(r["skip_fraction"], LAYERS)
    assert set(result["hf_generate_ratio"]) == {"1", "2"}
    assert all(v > 0 for v in result["hf_generate_ratio"].values())
    assert set(result["full_vs_full"]) == {"1", "2"} and all(v["ratio"] > 0 for v in result["full_vs_full"].values())
    for r in rows:
        low, high = r["speedup_quartiles"]
        assert low <= high
    assert result["settings"]["steps"] == 3 and result["settings"]["batch_sizes"] == [1, 2]


def test_a_row_keeps_the_round_whose_paired_ratio_is_the_median():
    # round 2 ran in a slow spell (both calls slow), round 3 in a fast one for the pattern only:
    # each side's least time (0.5 and 1.0) would pair rounds 3 and 1 into a speedup of 2.0
    c = Config("x", None, times=[1.0, 3.0, 0.5], full_times=[1.5, 4.8, 1.2])
    assert _paired(c) == (3.0, 4.8)  # ratios 1.5, 1.6, 2.4: the median is round 2's
    c = Config("x", None, times=[1.0, 3.0, 0.5, 2.0], full_times=[1.5, 4.8, 1.2, 2.2])
    assert _paired(c) == (1.0, 1.5)  # an even count keeps the lower median (1.5 of 1.1, 1.5, 1.6, 2.4)
    assert _paired(Config("y", None, times=[2.0], full_times=[1.0])) == (2.0, 1.0)
    # the spread around it: quartiles of the ratios 1.1, 1.5, 1.6, 2.4
    assert _quartiles(c) == pytest.approx([1.4, 1.8])


def test_a_round_times_the_two_runs_a_step_of_each_in_turn():
    log = []

    def stepper(name, seconds):
        return lambda: (lambda: log.append(name) or seconds)

    assert _in_turn(stepper("run", 1.0), stepper("full", 3.0), 4, full_first=False) == (1.0, 3.0)
    assert log == ["run", "full", "full", "run", "run", "full", "full", "run"]
    log.clear()
    _in_turn(stepper("run", 1.0), stepper("full", 3.0), 2, full_first=True)
    assert log == ["full", "run", "run", "full"]


def test_hf_generate_runs_our_steps_between_its_own_and_leaves_them_out_of_its_time(examples, family, monkeypatch):
    """Our step runs inside HF's loop, after each of its first `steps` logits; HF's time must
    not include it, nor may its tokens change. A fake clock ticks once a reading, and our
    "step" moves it on by 1000: HF's three steps read 1 tick each, 1003 each had ours stayed in."""
    import system15.speed as speed

    class Clock:
        now = 0.0

        def perf_counter(self):
            self.now += 1
            return self.now

    clock, calls = Clock(), []

    def ours():
        calls.append(len(calls))
        clock.now += 1000
        return 1000.0

    model = tiny_model(examples, family, shortcuts=True)
    ids = prompt(model.tokenizer, encode(model.tokenizer, examples[0]))
    with torch.inference_mode():
        start = Start.of(model, ids, 2)
        alone, _, _ = hf_generate(model, start, 3)
        monkeypatch.setattr(speed, "time", clock)
        beside, call, steps_time = hf_generate(model, start, 3, between=ours)
    assert beside.equal(alone) and calls == [0, 1, 2]
    assert steps_time == 3 and 0 < call < 1000


def test_ideal_speedup_is_the_flop_ratio_and_grows_with_the_skip_fraction(summary):
    result, _ = summary
    rows = result["rows"]
    for b in (1, 2):
        for pattern in PATTERNS:
            mine = sorted((r for r in rows if r["batch_size"] == b and r["pattern"] == pattern), key=lambda r: r["skip_fraction"])
            ideals = [r["ideal_speedup"] for r in mine]
            assert all(a < c for a, c in itertools.pairwise(ideals)), ideals
            # at skip 0 no layer is skipped but every router runs: the FLOPs say slightly slower, never faster
            assert ideals[0] < 1 and ideals[0] > 0.9
            assert mine[0]["efficiency"] is None
            for r in mine[1:]:
                assert r["efficiency"] == pytest.approx((1 - 1 / r["speedup"]) / (1 - 1 / r["ideal_speedup"]))
                assert r["ideal_speedup"] < r["ideal_speedup_layers"]  # the head is work no pattern skips
        # skip 0 and skip 1 are one mask whatever the pattern: one shared measurement
        for f in (0.0, 1.0):
            shared = {r["measurement"] for r in rows if r["batch_size"] == b and r["skip_fraction"] == f}
            assert len(shared) == 1


def test_ideal_speedup_at_skip_zero_is_full_over_full_plus_routers(summary):
    result, _ = summary
    model = build_model(speed_config(result["backbone"].split()[1]), texts=[PROMPT])
    model.add_shortcuts()
    counter, n = FlopCounter.for_model(model), len(model.tokenizer.encode(PROMPT))
    full = sum(LAYERS * counter.full_layer(n + t + 1) for t in range(3))
    row = next(r for r in result["rows"] if r["skip_fraction"] == 0.0)
    assert row["ideal_speedup_layers"] == pytest.approx(full / (full + 3 * LAYERS * counter.router()))
    head = 3 * 2 * model.backbone.hidden_size * model.backbone.head(torch.zeros(1, model.backbone.hidden_size)).shape[-1]
    assert row["ideal_speedup"] == pytest.approx((full + head) / (full + head + 3 * LAYERS * counter.router()))


def test_efficiency_is_one_where_the_flops_promise_nothing():
    assert efficiency(1.3, 1.0) == 1.0
    assert efficiency(0.98, 0.99) is None
    assert efficiency(1.5, 2.0) == pytest.approx((1 - 1 / 1.5) / 0.5)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_skip_masks_skip_the_promised_layers(pattern):
    for f in FRACTIONS:
        mask = skip_mask(pattern, f, 5, 8, seed=1)
        n = skipped_count(f, 8)
        assert mask.shape == (5, 8) and mask.dtype == torch.bool
        assert (mask.sum(1) == n).all()
        if pattern == "deep":
            assert mask[:, 8 - n:].all()
        if pattern == "shallow":
            assert mask[:, :n].all()
        if pattern == "mixed" and 0 < n < 8:
            assert len({tuple(row) for row in mask.tolist()}) == 5  # each row its own subset
    assert skip_mask(pattern, 0.5, 2, 8, seed=3).equal(skip_mask(pattern, 0.5, 2, 8, seed=3))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_forced_mask_is_obeyed_at_every_step_whatever_the_routers_say(examples, family, pattern):
    model = randomise_routers(tiny_model(examples, family, shortcuts=True, **{"backbone.n_layer": LAYERS}))
    prompts = [prompt(model.tokenizer, encode(model.tokenizer, e)) for e in examples[:3]]
    own = generate(model, prompts, K=2, route=Route("hard", 0.5), max_new_tokens=4)
    assert any(not all(step) for g in own for step in g.ran), "the routers should skip somewhere on their own"
    for f in FRACTIONS:
        mask = skip_mask(pattern, f, len(prompts), LAYERS, seed=2)
        gens = generate(model, prompts, K=2, route=Route("hard", 0.5, "fill", skip=mask), max_new_tokens=4)
        for row, g in enumerate(gens):
            assert g.ran and all(step == [not s for s in mask[row].tolist()] for step in g.ran)


def test_forced_skip_everything_and_nothing_match_the_thresholds(examples, family):
    """Every layer forced skipped decodes as lambda_depth 0 (every router says skip); none
    skipped decodes as lambda_depth 1 and as the full path."""
    model = randomise_routers(tiny_model(examples, family, shortcuts=True, **{"backbone.n_layer": LAYERS}))
    prompts = [prompt(model.tokenizer, encode(model.tokenizer, e)) for e in examples[:3]]

    def run(route):
        return [(g.tokens, g.ran) for g in generate(model, prompts, K=2, route=route, max_new_tokens=6)]

    every, none = torch.ones(3, LAYERS, dtype=torch.bool), torch.zeros(3, LAYERS, dtype=torch.bool)
    assert run(Route("hard", 0.5, "fill", skip=every)) == run(Route("hard", 0.0))
    assert run(Route("hard", 0.5, "fill", skip=none)) == run(Route("hard", 1.0))
    assert [t for t, _ in run(Route("hard", 0.5, "fill", skip=none))] == [t for t, _ in run(FULL)]


def test_a_mask_of_the_wrong_shape_is_refused(examples):
    model = tiny_model(examples, "gpt2", shortcuts=True)
    prompts = [prompt(model.tokenizer, encode(model.tokenizer, e)) for e in examples[:2]]
    with pytest.raises(ValueError, match="forced skip mask"):
        generate(model, prompts, K=1, route=Route("hard", 0.5, skip=torch.zeros(3, model.num_layers, dtype=torch.bool)))


def test_our_full_path_chooses_what_hf_generate_chooses(examples, family):
    """Greedy on the same tokens; HF was told not to stop, so where we would choose <eos>, HF
    chose its next best."""
    model = tiny_model(examples, family, shortcuts=True)
    ids = prompt(model.tokenizer, encode(model.tokenizer, examples[0]))
    record = []
    with torch.inference_mode():
        start = Start.of(model, ids, 2)
        tokens, call, steps_time = hf_generate(model, start, 5)
        decode(model, start, tokens[:, :5], FULL, record=record)
    assert tokens.shape == (2, 6) and call >= steps_time > 0
    for t, (ran, chosen) in enumerate(record):
        assert all(all(r) for r in ran)
        for ours, theirs in zip(chosen, tokens[:, t + 1].tolist()):
            assert ours == theirs or ours == model.tokenizer.eos_id


def test_the_profile_books_every_part_to_its_layer_kind(examples, family):
    model = tiny_model(examples, family, shortcuts=True, **{"backbone.n_layer": LAYERS})
    parts = profile_step(model, examples[0].question, steps=3, batch=2, rounds=1)
    full, deep, mixed = parts["b1_full"], parts["b1_deep_0.5"], parts["b2_mixed_0.5"]
    assert set(full) >= {"step_ms", "layers_ms", "outside_layers_ms", "full"} and full["full"]["per_step"] == LAYERS
    assert {"layer", "attention_kv_cat", "append_kv"} <= set(full["full"])
    assert deep["skipped"]["per_step"] == deep["ran"]["per_step"] == LAYERS / 2
    assert {"router", "adapters", "kv_fill", "append_kv", "rest"} <= set(deep["skipped"]) and "layer" not in deep["skipped"]
    assert {"router", "layer", "append_kv", "rest"} <= set(deep["ran"]) and "adapters" not in deep["ran"]
    # two rows with different subsets of equal size disagree on at least two layers
    assert sum(v["per_step"] for v in mixed.values() if isinstance(v, dict)) == LAYERS and mixed["mixed"]["per_step"] >= 2
    assert {"router", "adapters", "layer", "rest"} <= set(mixed["mixed"])  # K/V fill only where the rows are gathered
    assert set(parts["b1_append"]) == {"cat", "preallocated", "cache_length"}
    # the timers are gone afterwards
    from system15 import engine
    from system15.shortcuts import FoldedShortcut
    assert engine._hard_layer.__name__ == "_hard_layer" and FoldedShortcut.decide.__name__ == "decide"
    assert "run_layer" not in vars(model.backbone)


def test_a_trained_model_folder_adds_its_own_routing(tmp_path, examples):
    model = randomise_routers(tiny_model(examples, "gpt2", shortcuts=True))
    model.save(tmp_path / "model")
    result = run_speed(speed_config("gpt2"), model_dir=tmp_path / "model", batch_sizes=[1], steps=3, rounds=1,
                       results_root=tmp_path, prompt=examples[0].question, fractions=(0.0, 1.0), patterns=("deep",),
                       profile=False, quiet=True)
    learned = [r for r in result["rows"] if r["pattern"] == "learned"]
    assert len(learned) == 1 and ROW_KEYS <= set(learned[0])
    assert 0.0 <= learned[0]["skip_fraction"] <= 1.0 and not math.isnan(learned[0]["ideal_speedup"])


@pytest.mark.parametrize("args, message", [(["--batch-sizes", "0"], "--batch-sizes"),
                                           (["--batch-sizes", "1", "1"], "--batch-sizes"),
                                           (["--steps", "1"], "--steps"), (["--rounds", "0"], "--rounds")])
def test_bad_settings_exit_2_with_one_clear_line(args, message, capsys):
    assert main(["speed", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_missing_model_folder_exits_2(tmp_path, capsys):
    pairs = [f"{k}={v}" for k, v in {"backbone.source": "scratch", "backbone.n_layer": 2, "backbone.n_embd": 16,
                                      "backbone.n_head": 2}.items()]
    assert main(["speed", "--model", str(tmp_path / "nothing"), "--results", str(tmp_path), *pairs]) == 2
    assert "nothing" in capsys.readouterr().err


def test_the_cli_writes_the_results(tmp_path, capsys):
    pairs = ["backbone.source=scratch", "backbone.n_layer=2", "backbone.n_embd=16", "backbone.n_head=2",
             "architecture.adapter_dim=4", "architecture.router_hidden=4"]
    assert main(["speed", "--batch-sizes", "1", "--steps", "2", "--rounds", "1", "--results", str(tmp_path), *pairs]) == 0
    summary = json.loads((tmp_path / "speed" / "summary.json").read_text())
    assert summary["command"].startswith("system15 speed --batch-sizes 1")
    assert summary["backbone"] == "scratch gpt2 2x16" and summary["profile"]["b1_full"]["step_ms"] > 0
    assert "written:" in capsys.readouterr().out
