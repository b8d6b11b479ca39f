"""The Python API as a researcher meets it: a Hugging Face backbone folder and data files of
their own, three rungs trained, a model folder that travels, and answers with their routes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import system15
from system15.data import DataError, SyntheticTask
from system15.inference import Answer
from tests.helpers import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def write_tiny_hf_folder(folder: Path, family: str, texts: list[str]) -> Path:
    """A real HF model folder (config, safetensors weights, fast tokenizer), small enough to
    train in seconds: a byte-level BPE learned from `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")
    ids = dict(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    if family == "gpt2":
        lm = GPT2LMHeadModel(GPT2Config(n_positions=128, n_embd=32, n_layer=2, n_head=2, **ids))
    else:
        lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=128, **ids))
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


STAGE = "{steps: 2, batch_size: 4, eval_every: 2, warmup: 1}"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_train_save_move_and_answer_from_your_own_backbone_and_data(tmp_path, family):
    examples = SyntheticTask(n_steps=2).generate(60, seed=3)
    backbone = write_tiny_hf_folder(tmp_path / "backbone", family, [e.text for e in examples])
    data = tmp_path / "data"
    data.mkdir()
    train = write_jsonl(data / "train.jsonl", examples[:48])
    test = write_jsonl(data / "test.jsonl", examples[48:], plain=True)
    config = system15.load_config(None, [
        "name=mine", "backbone.source=hf", f"backbone.path={backbone}", "task.name=files", f"task.train={train}",
        f"task.test={test}", "task.n_valid=4", "task.max_new_tokens=12", "architecture.K=2", "eval.batch_size=8",
        "architecture.adapter_dim=4", "architecture.router_hidden=4",
        *(f"stages.{m}={STAGE}" for m in ("cot", "latent", "system15"))])
    for method in ("cot", "latent", "system15"):
        model = system15.fit(method, config, runs=tmp_path / "runs")
    assert model.method == "system15" and model.shortcuts is not None and model.spec.K == 2
    question = examples[50].question
    before = model.answer([question])[0]
    model.save(tmp_path / "model")

    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(tmp_path / "model", moved)
    for gone in (backbone, data, tmp_path / "runs", tmp_path / "model"):
        shutil.rmtree(gone)
    saved = "".join(p.read_text(errors="replace") for p in moved.iterdir() if p.suffix == ".json")
    assert str(tmp_path) not in saved, "the model folder may not name the paths it was trained with"

    loaded = system15.load(moved)
    out = loaded.answer([question, examples[51].question], batch_size=2)
    assert len(out) == 2 and all(isinstance(a, Answer) for a in out)
    a = out[0]
    assert a.text == before.text and a.flops == before.flops, "the moved folder answers as the trained model did"
    assert a.thought_steps == 2 and a.decoding_steps == len(a.routes)
    assert [r.kind for r in a.routes[:2]] == ["thought", "thought"] and a.routes[2].kind == "token"
    assert all(len(r.ran) == loaded.num_layers for r in a.routes)
    assert all(r.critical is None for r in a.routes[:2]), "a bare question gives no label to its thought steps"
    assert a.flops > 0 and (a.value is None or str(a.value) == a.answer.replace(",", ""))


def _hub_cache(home: Path, model_id: str, texts) -> None:
    """A model in the hub cache's own layout, as a download would leave it."""
    repo = home / "hub" / f"models--{model_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    write_tiny_hf_folder(repo / "snapshots" / commit, "gpt2", texts)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_a_hub_id_loads_offline_from_the_cache_and_an_unknown_one_fails_in_one_line(tmp_path, examples):
    _hub_cache(tmp_path / "home", "tiny-org/tiny-gpt2", [e.text for e in examples])
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    script = ("import sys; from system15.config import load_config; from system15.model import build_model\n"
              "m = build_model(load_config(None, ['backbone.source=hf', 'backbone.path=' + sys.argv[1]]), [])\n"
              "print('layers', m.backbone.num_layers)")
    ok = subprocess.run([sys.executable, "-c", script, "tiny-org/tiny-gpt2"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "layers 2" in ok.stdout
    (tmp_path / "recipe.yaml").write_text("name: hub\n")
    bad = subprocess.run([sys.executable, "-m", "system15.cli", "train", "--method", "cot", "--recipe", "recipe.yaml",
                          "backbone.source=hf", "backbone.path=nobody/nothing", "task.n_train=8", "task.n_valid=2",
                          "task.n_test=2", f"stages.cot={STAGE}"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "'nobody/nothing'" in lines[0] and "no hub was reachable" in lines[0], bad.stderr
    assert not (tmp_path / "runs").exists(), "nothing is written for a backbone that cannot load"


def test_a_bad_line_names_file_line_and_field_and_writes_nothing(tmp_path, examples):
    train = write_jsonl(tmp_path / "train.jsonl", examples[:6])
    with open(train, "a") as f:
        f.write(json.dumps({"question": "q", "cot": ["x"], "critical": [True, False], "answer": 1}) + "\n")
    config = system15.load_config(None, ["task.name=files", f"task.train={train}", f"stages.cot={STAGE}"])
    with pytest.raises(DataError, match=r"train.jsonl:7: critical: 2 labels for 1 steps"):
        system15.fit("cot", config, runs=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
