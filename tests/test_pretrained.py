"""Pretrained backbones that ship inside PyPI packages: SmolLM2-135M (GGUF) and GPT-2 BPE."""

import pytest
import torch

from system15.backbone import positions_from_mask
from system15.config import load_config
from system15.engine import generate
from system15.layout import pad
from system15.model import build_model, smollm2_gguf_path
from system15.tokenizer import BOT, EOT, gpt2_bpe_tokenizer


@pytest.fixture(scope="module")
def smollm2():
    try:
        smollm2_gguf_path()
    except RuntimeError as e:
        pytest.fail(f"{e} (the README's install command installs it)")
    return build_model(load_config(None, ["backbone.source=smollm2"]), []).eval()


def test_smollm2_gguf_loads_as_llama_and_matches_hf(smollm2):
    bb = smollm2.backbone
    assert bb.family == "llama" and bb.num_layers == 30
    tok = smollm2.tokenizer
    ids, visible = pad([tok.encode("The capital of France is"), tok.encode("2 + 2 = 4, and 3 + 3 =")], tok.pad_id, left=True)
    pos = positions_from_mask(visible)
    with torch.no_grad():
        ref = bb.lm(input_ids=ids, attention_mask=visible.long(), position_ids=pos).logits
        final, _ = bb.forward_full(bb.embed(ids), pos, visible)
    assert (bb.head(final) - ref)[visible].abs().max() <= 1e-4


def test_smollm2_generates_like_hf_generate(smollm2):
    tok = smollm2.tokenizer
    ids = tok.encode("The capital of France is")
    ours = generate(smollm2, [ids], K=None, max_new_tokens=6)[0].tokens
    ref = smollm2.backbone.lm.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    assert ours == ref[:len(ours)] and len(ours) >= 1
    assert "Paris" in tok.decode(ours)


def test_thought_markers_are_single_new_tokens(smollm2):
    tok = smollm2.tokenizer
    assert tok.encode(BOT) == [tok.bot_id] and tok.encode(EOT) == [tok.eot_id]
    assert smollm2.backbone.embed(torch.tensor([tok.bot_id, tok.eot_id])).shape[0] == 2


def test_gpt2_bpe_files_from_the_package():
    tok = gpt2_bpe_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]  # the official GPT-2 ids
    assert tok.decode(tok.encode(f"a {BOT} b")) == "a  b"
    assert tok.bot_id >= 50257 and tok.eot_id >= 50257


@pytest.mark.parametrize("choice", ["gpt2", "folder"])
def test_scratch_backbone_takes_the_gpt2_bpe_or_a_tokenizer_folder(tmp_path, choice):
    if choice == "folder":
        gpt2_bpe_tokenizer().save(tmp_path)
        choice = str(tmp_path)
    overrides = ["backbone.n_layer=1", "backbone.n_embd=16", "backbone.n_head=2", f"backbone.tokenizer={choice}"]
    model = build_model(load_config(None, overrides), [])
    tok = model.tokenizer
    assert tok.encode("Hello world") == [15496, 995] and tok.bot_id >= 50257
    assert model.backbone.embed(torch.tensor([tok.eot_id])).shape == (1, 16)
