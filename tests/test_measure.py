"""Measuring trained rungs (measure.py): the fingerprint of the code that decodes test records,
when kept test records are reused, a results row, and the threshold sweep. The tests on the
ladder in miniature train it once (the `ladder` fixture, tests/conftest.py)."""

from __future__ import annotations

import dataclasses
import importlib
import shutil
from pathlib import Path

import pytest

import system15
from system15 import measure
from system15.data import load_splits
from system15.evaluate import Record
from system15.measure import (DECODING_SOURCES, TEST_RECORDS, backbone_name, decoding_digest, evaluate_rung, row_of,
                              timed)
from system15.model import load_reasoning_model
from system15.rungs import ladder_rung
from tests.helpers import tiny_config, tiny_model

PACKAGE = Path(system15.__file__).resolve().parent


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """The package's decoding sources (and one file that is not one) copied to a folder the
    digest reads instead: `decoding_digest` hashes the files beside measure.py."""
    copy = tmp_path / "system15"
    for name in (*DECODING_SOURCES, "report.py"):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PACKAGE / name, copy / name)
    monkeypatch.setattr(measure, "__file__", str(copy / "measure.py"))
    return copy


def digest() -> str:
    return decoding_digest.__wrapped__()  # uncached: the cached one is computed once per process


def test_the_digest_reads_the_sources_not_where_they_lie(package_copy, monkeypatch):
    copied = digest()
    monkeypatch.setattr(measure, "__file__", str(PACKAGE / "measure.py"))
    assert digest() == copied  # the same bytes in another folder: the same code
    assert len(copied) == 64  # a SHA-256, in hex


@pytest.mark.parametrize("name", ["engine.py", "tokenizer.py", "data/records.py"])
def test_the_digest_changes_when_a_decoding_source_changes(package_copy, name):
    before = digest()
    with open(package_copy / name, "a") as f:
        f.write("\n# changed\n")
    assert digest() != before


def test_the_digest_ignores_code_that_does_not_decode(package_copy):
    before = digest()
    with open(package_copy / "report.py", "a") as f:
        f.write("\n# changed\n")
    assert digest() == before


@pytest.mark.parametrize("name", ["torch", "transformers"])
def test_the_digest_changes_with_the_library_versions(package_copy, monkeypatch, name):
    library = importlib.import_module(name)  # the module the digest imports now (transformers may swap its own)
    before = digest()
    monkeypatch.setattr(library, "__version__", library.__version__ + ".post1")
    assert digest() != before


def record(correct: bool, **counts) -> Record:
    return Record("s", "1", "1" if correct else "2", correct, decoding_steps=4, forwards=4, flops=400, **counts)


def test_a_row_keeps_skip_fractions_only_where_layers_can_skip():
    records = [record(True, skipped_critical=1, layers_critical=4, skipped_noncritical=3, layers_noncritical=12),
               record(False, layers_critical=4, layers_noncritical=12)]
    s15 = row_of("system15", records)
    assert s15["method"] == "system15" and s15["accuracy"] == 0.5 and s15["flops_per_step"] == 100
    assert (s15["skip_frac_critical"], s15["skip_frac_noncritical"], s15["critical_layers_per_example"]) == (1 / 8, 3 / 24, 4)
    latent = row_of("latent", records)
    assert not {"skip_frac_critical", "skip_frac_noncritical", "critical_layers_per_example"} & latent.keys()
    assert latent["accuracy"] == 0.5


def test_a_timed_run_is_the_model_with_its_own_K_and_route(examples):
    model = tiny_model(examples, shortcuts=True)
    model.spec.K, model.spec.lambda_depth = 3, 0.7
    run = timed(model)
    assert run[0] is model and run[1] == 3 and (run[2].mode, run[2].lambda_depth) == ("hard", 0.7)
    assert timed(model, K=1, lambda_depth=0.2)[1:] == (1, dataclasses.replace(run[2], lambda_depth=0.2))


def test_the_backbone_is_named_by_its_size_or_its_source():
    config = tiny_config()
    assert backbone_name(config) == "gpt2 from scratch (3 layers, width 32)"
    hub = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, source="hf", path="org/model"))
    assert backbone_name(hub) == "org/model"


# -- on the ladder in miniature -------------------------------------------------------------

def test_test_records_are_reused_only_for_the_same_weights_set_and_decoding(ladder, monkeypatch):
    """A ladder stopped during timing or the sweep resumes without decoding the test set again."""
    root, config, summary = ladder
    runs, test = root / "runs" / "tiny", load_splits(config)["test"]
    decoded = []
    real = measure.evaluate
    monkeypatch.setattr(measure, "evaluate", lambda *a, **k: decoded.append(a[1]) or real(*a, **k))
    by_method = {r["method"]: r for r in summary["rows"]}
    for method in ("cot", "system15"):
        model = ladder_rung(config, method, load_splits(config), runs)
        recs = evaluate_rung(config, method, model, test, runs / method)
        assert sum(r.correct for r in recs) / len(recs) == by_method[method]["accuracy"]
    assert decoded == []
    model = ladder_rung(config, "system15", load_splits(config), runs)
    model.spec.lambda_depth = 0.9
    evaluate_rung(config, "system15", model, test, runs / "system15")  # another threshold
    model.spec.lambda_depth = config.architecture.lambda_depth
    evaluate_rung(config, "system15", model, test[:5], runs / "system15")  # another test set
    (runs / "system15" / TEST_RECORDS).write_text('{"key": ')  # torn: decoded again, not an error
    evaluate_rung(config, "system15", model, test, runs / "system15")
    assert len(decoded) == 3
    evaluate_rung(config, "system15", model, test, runs / "system15")  # all the same: reused
    assert len(decoded) == 3
    monkeypatch.setattr(measure, "decoding_digest", lambda: "other code")  # the engine changed
    evaluate_rung(config, "system15", model, test, runs / "system15")
    assert len(decoded) == 4


def test_the_sweep_can_decode_the_start_of_the_test_set_only(ladder, monkeypatch):
    """eval.sweep_examples: each sweep point decodes that many test examples (a GPU lease's
    minutes go to training instead); 0 keeps the whole test set."""
    root, config, _ = ladder
    splits = load_splits(config)
    model = load_reasoning_model(root / "runs" / "tiny" / "system15" / "best", config)
    seen = []
    decode = model.answer
    monkeypatch.setattr(model, "answer", lambda examples, **kw: seen.append(list(examples)) or decode(examples, **kw))
    for n, expected in ((5, splits["test"][:5]), (0, splits["test"])):
        seen.clear()
        cfg = dataclasses.replace(config, eval=dataclasses.replace(config.eval, sweep_examples=n))
        points = measure.sweep(cfg, model, None, splits)
        assert seen == [expected] * len(points) and {p["examples"] for p in points} == {len(expected)}
