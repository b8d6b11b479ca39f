"""Long-run hygiene: a non-finite loss or gradient stops the run and keeps the last good
checkpoint; the run directory says which code, settings and seed made it; nothing is ever
unpickled from disk; no module of the package imports, even lazily, a module that imports it."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch

import system15
from system15.checkpoint import checkpoints, verify
from system15.train.loop import NonFiniteLoss, fit

from tests.helpers.tiny_run import Slow, tiny_config, tiny_setup

SRC = Path(system15.__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("one_thread")


class NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward: a finite loss with a poisoned gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class PoisonAt(Slow):
    """The wrapped objective, except at step `at`: NaN loss, or (grad=True) NaN gradients."""

    def __init__(self, inner, at: int, grad: bool = False):
        super().__init__(inner, 0.0)
        self.at, self.grad, self.step = at, grad, -1

    def on_step(self, step, total):
        self.step = step
        super().on_step(step, total)

    def loss(self, model, batch):
        loss, metrics = super().loss(model, batch)
        if self.step != self.at:
            return loss, metrics
        return (NanGrad.apply(loss), metrics) if self.grad else (loss * float("nan"), metrics)


@pytest.mark.parametrize("grad, clip, what", [(False, 1.0, "loss is nan"), (True, 1.0, "gradient norm is nan"),
                                             (True, 0.0, "gradient norm is nan")])
def test_non_finite_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, grad, clip, what):
    """Poisoned at the 15th step (index 14), after the step-10 checkpoint."""
    config = tiny_config(steps=30, eval_every=10)
    config.stage("cot").grad_clip = clip
    model, objective, encoded, _ = tiny_setup(config)
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLoss) as err:
        fit(model, PoisonAt(objective, 14, grad), encoded, config.stage("cot"), run_dir, quiet=True)
    good = run_dir / "checkpoints" / "step-0000010"
    message = str(err.value)
    assert what in message and "at step 15" in message and str(good) in message
    assert checkpoints(run_dir) == [good], "no checkpoint may be written after the bad step"
    verify(good)
    verify(run_dir / "best")
    assert not (run_dir / "done.json").exists()
    logged = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert max(logged) == 14, "the bad step must not be logged as a step taken"
    assert all(torch.isfinite(p).all() for p in model.parameters()), "the optimizer stepped on NaN"


def test_run_json_records_config_version_revision_and_seed(tmp_path):
    config = tiny_config(steps=2, eval_every=2, seed=7)
    model, objective, encoded, _ = tiny_setup(config)
    fit(model, objective, encoded, config.stage("cot"), tmp_path / "run", quiet=True, run_config=config.to_dict())
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["config"] == config.to_dict()
    assert record["train"] == vars(config.stage("cot"))
    assert record["version"] == system15.__version__
    assert record["seed"] == 7 and record["method"] == "cot" and record["processes"] == 1
    assert record["torch"] == torch.__version__
    in_git = any((p / ".git").exists() for p in SRC.parents)
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", record["git"]) if in_git else record["git"] == "unknown"


def test_a_launch_that_accelerate_does_not_see_is_refused(monkeypatch):
    """accelerate made without cpu=True on a CUDA-less machine ignores the launch; every
    process would then train alone and overwrite the others' files."""
    from accelerate import Accelerator

    from system15.train.loop import ready_for_training

    accelerator = Accelerator(cpu=True)  # single process: the launch variables appear only below
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="launched as 2 processes but accelerate sees 1"):
        ready_for_training(accelerator)


def test_a_callers_accelerator_is_set_to_find_unused_parameters():
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from system15.train.loop import ready_for_training

    plain = ready_for_training(Accelerator(cpu=True))
    assert plain.ddp_handler.to_kwargs() == {"find_unused_parameters": True}
    tuned = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(bucket_cap_mb=5)])
    assert ready_for_training(tuned).ddp_handler.to_kwargs() == {"bucket_cap_mb": 5, "find_unused_parameters": True}


# -- nothing unpickled from disk -------------------------------------------------------------

FORBIDDEN = [
    (re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"\bimport\s+(c?pickle|dill|joblib)\b|\bfrom\s+(c?pickle|dill|joblib)\s+import\b"), "pickle import"),
    (re.compile(r"\b(c?pickle|dill|joblib)\.(load|loads|Unpickler)\b"), "unpickling"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy allow_pickle=True"),
    (re.compile(r"trust_remote_code\s*=\s*True"), "trust_remote_code=True"),
]


def offences(text: str) -> list[str]:
    return [why for pattern, why in FORBIDDEN if pattern.search(text)]


def test_the_detector_catches_what_it_should():
    assert offences("state = torch.load(path)") == ["torch.load without weights_only=True"]
    assert offences("torch.load(path, map_location='cpu', weights_only=True)") == []
    assert offences("import pickle") == ["pickle import"]
    assert offences("obj = pickle.loads(blob)") == ["unpickling"]
    assert offences("AutoModel.from_pretrained(p, trust_remote_code=True)") == ["trust_remote_code=True"]
    assert offences("trust_remote_code=cfg.trust_remote_code  # nothing is unpickled") == []


def test_no_pickle_is_loaded_from_disk_anywhere_in_the_package():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    found = {f"{p.relative_to(SRC.parent)}:{n}: {why}": line.strip()
             for p in files for n, line in enumerate(p.read_text().splitlines(), 1) for why in offences(line)}
    assert not found, found


# -- no import cycle -------------------------------------------------------------------------

def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, read from the source with `ast`: every
    `import` and `from ... import`, at any depth (inside functions too), relative ones resolved.
    Importing a package counts as importing its `__init__`; `from p import name` imports the
    submodule p.name when there is one, else p itself. The parent packages Python initialises
    on the way to a submodule are not counted: they are already importing when a sibling asks."""
    def name_of(path: Path) -> str:
        parts = path.relative_to(package.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name_of(p): p for p in package.rglob("*.py")}
    graph = {}
    for module, path in modules.items():
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]  # the package it is in
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(here.split(".")[:len(here.split(".")) - node.level + 1] + [node.module or ""]).rstrip(".")
                else:
                    base = node.module
                targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names)
        graph[module] = {t for t in targets if t in modules and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the path being explored, then "done"
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_import_graph_reader_sees_lazy_relative_and_package_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("def f():\n    from . import a\n")
    (pkg / "a.py").write_text("from .sub import b\nfrom .sub.b import thing\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("import os\nimport pkg.sub\n\ndef g():\n    from .. import name\n")
    graph = import_graph(pkg)
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(), "pkg.sub.b": {"pkg.sub", "pkg"}}
    assert find_cycle(graph) == ["pkg", "pkg.a", "pkg.sub.b", "pkg"]
    assert find_cycle({**graph, "pkg.sub.b": {"pkg.sub"}}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph(SRC)
    assert {"system15.train", "system15.train.objective", "system15.cli"} <= graph.keys()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
