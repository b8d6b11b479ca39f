"""The command line: every verb runs, help comes from the config, errors are one clear line."""

import json
import re

import pytest
import torch

from system15.checkpoint import write_atomic
from system15.cli import main
from system15.config import help_lines

from tests.helpers import DATA_ROOT, tiny_config, tiny_model, tiny_pairs

TINY = ["backbone.n_layer=2", "backbone.n_embd=32", "backbone.n_head=2", f"task.data_root={DATA_ROOT}",
        "task.n_train=64", "task.n_valid=4", "task.n_test=6", "task.max_new_tokens=8", "methods=[cot,nocot]",
        "eval.timing_examples=2", "eval.timing_batch_sizes=[1]",
        "stages.cot={steps: 2, batch_size: 4, eval_every: 2, warmup: 1}",
        "stages.nocot={steps: 2, batch_size: 4, eval_every: 2, warmup: 1}"]


def test_demo_verb_runs_the_ladder_and_prints_the_table(tmp_path, capsys):
    code = main(["demo", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "res"), "name=cli", *TINY])
    assert code == 0
    out = capsys.readouterr().out
    assert "| cot |" in out and "| nocot |" in out
    summary = json.loads((tmp_path / "res" / "cli" / "summary.json").read_text())
    assert summary["command"].startswith("system15 demo")
    assert [r["method"] for r in summary["rows"]] == ["cot", "nocot"]


def test_config_verb_lists_every_setting_with_help(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for key in ("architecture.lambda_depth", "architecture.K", "architecture.kv_policy", "stages", "backbone.trust_remote_code"):
        assert key in out
    assert len(help_lines()) > 40


def test_eval_reads_any_jsonl_with_named_fields(tmp_path, capsys, examples):
    model = tiny_model(examples, thought=None)
    model.method = "nocot"
    model.save(tmp_path / "model")
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps({"q": e.question, "a": int(e.answer)}) for e in examples[:5]) + "\n")
    code = main(["eval", "--model", str(tmp_path / "model"), "--data", str(data), "--question-field", "q",
                 "--answer-field", "a", "--max-new-tokens", "4"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["examples"] == 5 and 0 <= summary["accuracy"] <= 1


def test_eval_names_the_bad_line(tmp_path, capsys, examples):
    model = tiny_model(examples, thought=None)
    model.save(tmp_path / "model")
    data = tmp_path / "bad.jsonl"
    data.write_text('{"q": "1+1?", "a": 2}\n{"q": "broken", "a": \n')
    assert main(["eval", "--model", str(tmp_path / "model"), "--data", str(data), "--question-field", "q",
                 "--answer-field", "a"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err


@pytest.mark.parametrize("shortcuts", [True, False], ids=["system15", "latent"])
@pytest.mark.parametrize("verb", ["eval", "explain"])
def test_a_threshold_out_of_range_is_refused_for_every_model(tmp_path, capsys, examples, shortcuts, verb):
    model = tiny_model(examples, shortcuts=shortcuts)
    model.method = "system15" if shortcuts else "latent"
    model.save(tmp_path / "model")
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "a=1,b=2,c=a+b. c?", "answer": 3}\n')
    where = ["--data", str(data)] if verb == "eval" else ["a=1,b=2,c=a+b. c?", "--png", str(tmp_path / "r.png")]
    assert main([verb, "--model", str(tmp_path / "model"), *where, "--lambda-depth", "1.5"]) == 2
    assert "lambda_depth: must lie in [0, 1], got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "r.png").exists()


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": 3}\n')
    assert main(["eval", "--model", str(tmp_path / "nope"), "--data", str(data)]) == 2
    assert "not a system15 model folder" in capsys.readouterr().err


def test_a_finished_run_with_other_settings_is_a_clear_error(tmp_path, capsys, examples):
    """`train` on a run folder left by other settings stops, names the key, and keeps the run."""
    model = tiny_model(examples, thought="pause")
    run = tmp_path / "runs" / "demo" / "pause"
    write_atomic(run / "best", model.save)
    trained_with = tiny_config(**{"baselines.pause_K": 5, "task.n_train": 64}).to_dict()
    (run / "run.json").write_text(json.dumps({"method": "pause", "config": trained_with, "train": {}}))
    (run / "done.json").write_text(json.dumps({"steps": 1, "seconds": 1.0}))
    before = sorted(p.name for p in run.rglob("*"))
    argv = ["train", "--method", "pause", "--runs", str(tmp_path / "runs"),
            *tiny_pairs(**{"baselines.pause_K": 2, "task.n_train": 64})]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(run) in err and "baselines.pause_K: trained with 5, asked for 2" in err
    assert sorted(p.name for p in run.rglob("*")) == before


def test_explain_prints_the_answer_and_the_routing_map_and_writes_its_picture(tmp_path, capsys, examples):
    model = tiny_model(examples, shortcuts=True)
    model.method, model.spec.K = "system15", 2
    with torch.no_grad():  # open the routers of layer 2 wide: every step skips it, and only it
        model.shortcuts[1].score.bias.fill_(9.0)
    model.save(tmp_path / "model")
    png = tmp_path / "map" / "routes.png"
    assert main(["explain", "--model", str(tmp_path / "model"), examples[0].question, "--max-new-tokens", "3",
                 "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert f"question: {examples[0].question}" in out and "decoding steps:" in out
    rows = [m.group(1) for m in re.finditer(r"^\s+\d+\s+.*\s([#.]+)$", out, re.M)]
    assert len(rows) >= 3 and all(row == "#.#" for row in rows), out
    assert "layers skipped: " in out and png.stat().st_size > 1000
