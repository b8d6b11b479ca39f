"""Run the official Coconut code (facebookresearch/coconut, a pinned checkout outside this
repository) on this project's data and backbone, on CPU, in one process; see README.md here.

Two steps, in two Python environments, because the official code needs transformers 4.46
(its GPT-2 forward passes the KV cache as tuples, which transformers 5 no longer takes) and
this project needs transformers 5:

  prepare  (this project's venv)  the recipe's splits in the official JSON layout, and the
           CoT checkpoint runs/<name>/cot/best as a Hugging Face GPT-2 folder with a
           tokenizer that gives the official strings our token ids (checked on every example);
  run      (the official code's venv)  the official run.py: Coconut training from that CoT
           model, stage 0 skipped as the official GSM8K recipe does, validation accuracy every
           epoch; then the checkpoint with the best validation accuracy is evaluated on the
           test split by run.py itself (only_eval), and result.json records both.

Nothing of the official code is copied here: `run` imports it from the checkout and, before
it does, makes its GPU-only calls work on CPU (the `cpu_shims`): NCCL -> gloo with world
size 1, integer device ids -> "cpu", FSDP/DDP -> a pass-through wrapper, wandb -> a stub
when it is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The official layout's fixed pieces (dataset.py: question + "\n", step + "\n", "### " + answer)
# become our layout's markers: the question ends in "\t" so that its "\n" can become <bot>;
# the steps' "\n" become nothing (our steps carry their own leading space); "### " becomes
# "<eot>#### ". The tokenizer's normalizer does this, so the official strings encode to the
# ids our CoT model was trained on.
QUESTION_END = "\t"


# -- prepare (this project's environment) ---------------------------------------------------

def official_record(example) -> dict:
    steps = [(" " if i else "") + s.text for i, s in enumerate(example.steps)]
    return {"question": example.question + QUESTION_END, "steps": steps, "answer": example.answer}


def hf_tokenizer(char_tokenizer):
    """Our character tokenizer as a transformers fast tokenizer over the same ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from system15.tokenizer import BOT, EOS, EOT, LAYOUT_SYMBOLS, PAD, UNK

    raw = Tokenizer(models.WordLevel({t: i for i, t in enumerate(char_tokenizer.tokens)}, unk_token=UNK))
    raw.normalizer = normalizers.Sequence([normalizers.Replace("### ", f"{EOT}#### "),
                                           normalizers.Replace(QUESTION_END + "\n", BOT),
                                           normalizers.Replace("\n", "")])
    symbols = [BOT, EOT, *sorted(LAYOUT_SYMBOLS, key=len, reverse=True)]
    pattern = "|".join(re.escape(s) for s in symbols) + r"|[\s\S]"
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    raw.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS, pad_token=PAD, unk_token=UNK)


def prepare(args) -> None:
    import torch

    import system15
    from system15.config import load_config
    from system15.data import load_splits
    from system15.layout import cot_target, encode, prompt

    out = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    config = load_config(args.recipe, args.overrides)
    splits = load_splits(config)
    for name, examples in splits.items():
        (out / f"{name}.json").write_text(json.dumps([official_record(e) for e in examples]))
    model = system15.load(Path(args.runs) / config.name / "cot" / "best")
    tok = model.tokenizer
    if getattr(tok, "kind", None) != "char":
        raise SystemExit("prepare: the adapter exports the from-scratch model with the character tokenizer")
    hf_tok = hf_tokenizer(tok)
    for e in (e for split in splits.values() for e in split):  # the official strings give our ids
        r, enc = official_record(e), encode(tok, e)
        got = hf_tok.encode(r["question"] + "\n") + [i for s in r["steps"] for i in hf_tok.encode(s + "\n")] \
            + hf_tok.encode("### " + r["answer"]) + [hf_tok.eos_token_id]
        if got != prompt(tok, enc) + cot_target(tok, enc):
            raise SystemExit(f"prepare: {e.source} tokenizes differently in the official layout")
    lm = model.backbone.lm
    lm.config.use_cache = True                  # the official forward reads the KV cache back
    lm.config.activation_function = "gelu_new"  # GPT-2's own name for the same function
    hf_dir = out / "gpt2-system15-cot"          # "gpt2" in the name: CODI picks GPT-2 code paths by it
    lm.save_pretrained(hf_dir)
    hf_tok.save_pretrained(hf_dir)
    meta = json.loads((hf_dir / "tokenizer_config.json").read_text())  # a class the official transformers 4.46 has
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({**meta, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=1))
    sample = torch.tensor([prompt(tok, encode(tok, splits["valid"][0]))])
    with torch.no_grad():
        logits = lm(input_ids=sample).logits
    texts = [official_record(e)["question"] + "\n" for e in splits["valid"][:20]]
    torch.save({"ids": sample, "logits": logits, "texts": texts, "text_ids": [hf_tok.encode(t) for t in texts]},
               out / "export_check.pt")
    (out / "prepared.json").write_text(json.dumps({
        "recipe": args.recipe, "overrides": args.overrides, "cot": str(Path(args.runs) / config.name / "cot" / "best"),
        "splits": {k: len(v) for k, v in splits.items()}, "coconut_c": config.baselines.coconut_c,
        "coconut_stages": config.baselines.coconut_stages}, indent=1))
    print(f"prepared {out}: {', '.join(f'{k} {len(v)}' for k, v in splits.items())}; model {hf_dir}")


# -- run (the official code's environment) --------------------------------------------------

def cpu_shims() -> None:
    """Make the official run.py's GPU-only calls run on CPU in this one process."""
    import importlib.machinery
    import importlib.util
    import types

    import torch
    import torch.distributed as dist

    def on_cpu(device):
        if (isinstance(device, int) and not isinstance(device, bool)) or (isinstance(device, torch.device) and device.type == "cuda"):
            return "cpu"
        return device

    init = dist.init_process_group
    dist.init_process_group = lambda backend=None, *a, **k: init("gloo", *a, **k)
    torch.cuda.set_device = lambda device: None
    tensor_to, module_to, make, load = torch.Tensor.to, torch.nn.Module.to, torch.tensor, torch.load
    torch.Tensor.to = lambda self, *a, **k: tensor_to(self, *map(on_cpu, a), **{n: on_cpu(v) for n, v in k.items()})
    torch.nn.Module.to = lambda self, *a, **k: module_to(self, *map(on_cpu, a), **{n: on_cpu(v) for n, v in k.items()})
    torch.tensor = lambda *a, device=None, **k: make(*a, device=on_cpu(device), **k)
    torch.load = lambda *a, map_location=None, **k: load(*a, map_location="cpu", **k)
    real_device = torch.device

    class DeviceType(type):  # torch.device(rank) -> cpu; isinstance checks see the real class
        def __instancecheck__(cls, obj):
            return isinstance(obj, real_device)

        def __call__(cls, *a, **k):
            return real_device(*map(on_cpu, a), **k)

    torch.device = DeviceType("device", (), {})

    class PassThrough:
        """What run.py uses of FSDP/DDP with one process: call, .module, parameters, state_dict."""

        def __init__(self, module, *args, **kwargs):
            self.module = module

        def __call__(self, *args, **kwargs):
            return self.module(*args, **kwargs)

        def parameters(self):
            return self.module.parameters()

        def state_dict(self):
            return self.module.state_dict()

    import torch.distributed.fsdp
    torch.distributed.fsdp.FullyShardedDataParallel = PassThrough
    torch.nn.parallel.DistributedDataParallel = PassThrough
    if importlib.util.find_spec("wandb") is None:  # run.py imports it; with debug off, rank 0 logs to it
        stub = types.ModuleType("wandb")
        stub.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # transformers looks it up; no metadata: "not installed"

        class Run:
            config = types.SimpleNamespace(update=lambda *a, **k: None)

            def log(self, *a, **k):
                pass

        stub.init = lambda *a, **k: Run()
        stub.Table = lambda *a, **k: types.SimpleNamespace(add_data=lambda *a, **k: None)
        sys.modules["wandb"] = stub


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def official_args(args, work: Path, prepared: dict, only_eval: bool, load: str = "None") -> dict:
    """The official args file (args/gsm_coconut.yaml's keys), with this comparison's values."""
    c = args.c_thought or prepared["coconut_c"]
    stages = args.max_latent_stage or prepared["coconut_stages"]
    final = args.epochs_per_stage * (stages + 1)  # the epoch the final stage (every step replaced) starts
    return {
        "project": "coconut", "save_path": str(work / "checkpoints"), "name": "eval" if only_eval else "coconut",
        "only_eval": only_eval, "coconut": True, "cot": False, "no_thoughts": False, "no_cot": False,
        "c_thought": c, "epochs_per_stage": args.epochs_per_stage, "max_latent_stage": stages,
        "pad_latent_to_max": True, "save_only_improve": False, "uniform_prob": 0.0,
        "model_id": str(work / "gpt2-system15-cot"), "load_model_path": load, "seed": 0,
        # stage 0 is the CoT model we start from, skipped as the official GSM8K recipe does (resume: 3)
        "resume": final + 1 if only_eval else args.epochs_per_stage,
        "bf16": False, "train_path": str(work / "train.json"),
        "val_path": str(work / ("test.json" if only_eval else "valid.json")),
        "reset_optimizer": True, "batch_size_training": args.batch_size, "debug": False,
        "gradient_accumulation_steps": 1, "num_epochs": final + args.final_epochs if not only_eval else final + 2,
        "lr": args.lr, "weight_decay": 0.01,
    }


def run_official(args) -> None:
    """One official run.py invocation in this process (its args file written first)."""
    import runpy

    cpu_shims()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()), WANDB_MODE="disabled")
    sys.path.insert(0, str(args.coconut))
    sys.argv = ["run.py", args.args_file]
    runpy.run_path(str(Path(args.coconut) / "run.py"), run_name="__main__")


def run(args) -> None:
    """Train with the official code, pick the checkpoint by validation accuracy, evaluate it on test."""
    import torch
    import transformers
    import yaml

    work = Path(args.work)
    prepared = json.loads((work / "prepared.json").read_text())
    check = torch.load(work / "export_check.pt")
    lm = transformers.AutoModelForCausalLM.from_pretrained(work / "gpt2-system15-cot")
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=check["ids"]).logits, check["logits"], rtol=1e-4, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(work / "gpt2-system15-cot")
    if [tok.encode(t) for t in check["texts"]] != check["text_ids"]:
        raise SystemExit("run: the exported tokenizer reads differently under the official code's transformers")
    pinned = Path(args.coconut) / "COMMIT"  # a `git archive` export (README.md) names its commit here
    commit = pinned.read_text().strip() if pinned.exists() else subprocess.run(
        ["git", "-C", str(args.coconut), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    logs = {}
    for phase in ("train", "test"):
        if phase == "test":
            accs = [float(a) for a in re.findall(r"Accuracy on validation set: \d+ / \d+ = ([0-9.]+)", logs["train"])]
            first = args.epochs_per_stage + 1  # run.py names a checkpoint by its epoch, counted from 1
            final = args.epochs_per_stage * ((args.max_latent_stage or prepared["coconut_stages"]) + 1) + 1
            scored = list(zip(range(first, first + len(accs)), accs))
            if args.select == "final":  # as ours: only checkpoints of the final stage may be chosen
                scored = [(e, a) for e, a in scored if e >= final] or scored
            best_epoch = max(scored, key=lambda ea: ea[1])[0]  # ties: the earlier epoch, as ours
            load = str(work / "checkpoints" / "coconut" / f"checkpoint_{best_epoch}")
        cfg = official_args(args, work, prepared, only_eval=phase == "test", load="None" if phase == "train" else load)
        args_file = work / f"official_{phase}.yaml"
        args_file.write_text(yaml.safe_dump(cfg))
        command = [sys.executable, str(Path(__file__).resolve()), "_official", "--coconut", str(args.coconut),
                   "--args-file", str(args_file)]
        began = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - began
        logs[phase] = done.stdout
        logs[f"{phase}_progress"] = done.stderr  # its tqdm bars: "batch i/n completed"
        (work / f"official_{phase}.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
        if done.returncode:
            raise SystemExit(f"official run.py ({phase}) failed; see {work / f'official_{phase}.log'}:\n"
                             + done.stderr[-3000:])
        logs[f"{phase}_seconds"] = seconds
    test = re.findall(r"Accuracy on validation set: (\d+) / (\d+) = ([0-9.]+)", logs["test"])[-1]
    steps = re.findall(r"batch (\d+)/(\d+) completed", logs["train_progress"])
    result = {
        "official_repo": "facebookresearch/coconut", "official_commit": commit,
        "command": " ".join(sys.argv), "prepared": prepared,
        "official_args_train": yaml.safe_load((work / "official_train.yaml").read_text()),
        "valid_accuracy_by_epoch": dict(zip(range(args.epochs_per_stage + 1, 999), [float(a) for a in re.findall(
            r"Accuracy on validation set: \d+ / \d+ = ([0-9.]+)", logs["train"])])),
        "chosen_epoch": best_epoch, "selection": args.select,
        "official_test_accuracy": float(test[2]), "test_examples": int(test[1]),
        "train_seconds": round(logs["train_seconds"], 1), "test_seconds": round(logs["test_seconds"], 1),
        "optimizer_steps_per_epoch": int(steps[-1][1]) if steps else None,
        "ours": ours_if_there(args),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("official_commit", "chosen_epoch", "official_test_accuracy",
                                             "test_examples", "train_seconds", "ours")}, indent=1))


def ours(summary_path: str) -> dict | None:
    """Our Coconut's row from a ladder's summary (results/<name>/summary.json), None without one."""
    summary = json.loads(Path(summary_path).read_text())
    row = next((r for r in summary["rows"] if r["method"] == "coconut"), None)
    return None if row is None else {"summary": summary_path, "test_accuracy": row["accuracy"],
                                     "train_examples": row.get("train_examples"), "test_examples": summary.get("test_examples")}


def ours_if_there(args) -> dict | None:
    """`run`'s --ours row; a summary not written yet (the ladder still running) is added later by `set-ours`."""
    if not args.ours:
        return None
    if not Path(args.ours).exists():
        print(f"{args.ours}: not there yet; add our row later with `set-ours`", file=sys.stderr)
        return None
    return ours(args.ours)


def set_ours(args) -> None:
    """Put our Coconut's row beside an official result.json written before the ladder finished."""
    path = Path(args.result)
    result = json.loads(path.read_text())
    result["ours"] = ours(args.ours)
    if result["ours"] is None:
        raise SystemExit(f"{args.ours}: no coconut row")
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({"official_test_accuracy": result["official_test_accuracy"], "ours": result["ours"]}, indent=1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    q = sub.add_parser("prepare", help="(this project's venv) data and model in the official layout")
    q.add_argument("--recipe", required=True)
    q.add_argument("--runs", default="runs")
    q.add_argument("--work", required=True, help="folder for the converted data, the HF model and the official checkpoints")
    q.add_argument("overrides", nargs="*", help="key=value, as for system15")
    q.set_defaults(func=prepare)
    r = sub.add_parser("run", help="(the official code's venv) official training, selection and test")
    r.add_argument("--coconut", required=True, help="a checkout of facebookresearch/coconut")
    r.add_argument("--work", required=True)
    r.add_argument("--out", required=True, help="where result.json goes")
    r.add_argument("--epochs-per-stage", type=int, default=3)
    r.add_argument("--final-epochs", type=int, default=3, help="epochs of the final stage (every step replaced)")
    r.add_argument("--c-thought", type=int, default=0, help="0: the recipe's baselines.coconut_c")
    r.add_argument("--max-latent-stage", type=int, default=0, help="0: the recipe's baselines.coconut_stages")
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--lr", type=float, default=1e-4)
    r.add_argument("--select", choices=("final", "any"), default="final",
                   help="final: the best validation epoch of the final stage (ours); any: of every epoch")
    r.add_argument("--ours", default="", help="a ladder's summary.json whose coconut row to set beside it")
    r.set_defaults(func=run)
    w = sub.add_parser("set-ours", help="add our Coconut's row to a result.json written without it")
    w.add_argument("--result", required=True)
    w.add_argument("--ours", required=True, help="a ladder's summary.json")
    w.set_defaults(func=set_ours)
    o = sub.add_parser("_official", help=argparse.SUPPRESS)
    o.add_argument("--coconut", required=True)
    o.add_argument("--args-file", required=True)
    o.set_defaults(func=run_official)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
