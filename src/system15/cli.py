"""`system15 <verb>`: demo | bench | ablate | train | eval | explain | speed | report | data | config.

Settings come from a recipe (`--recipe configs/x.yaml`) plus `key.sub=value` overrides;
`system15 config` lists every setting with its help text (from config.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from .checkpoint import CheckpointError, RunLockedError
from .config import METHODS, ConfigError, help_lines, load_config
from .rungs import StaleRunError

_REPO_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
DEMO_RECIPE = "configs/demo.yaml" if Path("configs/demo.yaml").exists() or not _REPO_RECIPE.exists() else str(_REPO_RECIPE)


def _command_line(argv: list[str]) -> str:
    return "system15 " + " ".join(shlex.quote(a) for a in argv)


def _add_recipe(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--recipe", default=default, help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings to override, e.g. stages.cot.steps=200")


def _pages_hint(results: str) -> None:
    from .report import sync_pages

    stale = sync_pages(results, write=False)
    if stale:
        print(f"pages quoting these results: {', '.join(map(str, stale))} (`system15 report --sync` rewrites them)")


def cmd_bench(args) -> int:
    from .recipes.ladder import run_ladder
    from .report import markdown_table

    config = load_config(args.recipe, args.overrides)
    summary = run_ladder(config, runs_root=args.runs, results_root=args.results, command=_command_line(args.argv))
    print(markdown_table(summary["rows"]))
    print(f"\nwritten: {Path(args.results) / config.name / 'summary.json'}")
    _pages_hint(args.results)
    return 0


def cmd_ablate(args) -> int:
    from .config import load_ablation
    from .recipes.ablation import run_ablation
    from .report import markdown_table

    ablation = load_ablation(args.ablation)
    summary = run_ablation(ablation, runs_root=args.runs, results_root=args.results, command=_command_line(args.argv))
    print(markdown_table(summary["rows"]))
    print(f"\nwritten: {Path(args.results) / ablation.name / 'summary.json'}")
    _pages_hint(args.results)
    return 0


def cmd_train(args) -> int:
    from .data import load_splits
    from .rungs import train_rung

    config = load_config(args.recipe, args.overrides)
    splits = load_splits(config)
    train_rung(config, args.method, splits, Path(args.runs) / config.name)
    print(f"best model: {Path(args.runs) / config.name / args.method / 'best'}")
    return 0


def cmd_eval(args) -> int:
    import system15

    from .data import read_examples
    from .evaluate import evaluate, summarize

    model = system15.load(args.model)
    examples = read_examples(args.data, fmt=args.format, question_field=args.question_field,
                             answer_field=args.answer_field, limit=args.limit)
    records = evaluate(model, examples, K=0 if args.no_cot else args.K, lambda_depth=args.lambda_depth,
                       kv_policy=args.kv_policy, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                       desc="eval")
    print(json.dumps(summarize(records), indent=2))
    return 0


def cmd_explain(args) -> int:
    import system15

    from .report import plot_routes, routing_map

    model = system15.load(args.model)
    answer = model.answer([args.question], K=args.K, lambda_depth=args.lambda_depth, kv_policy=args.kv_policy,
                          max_new_tokens=args.max_new_tokens)[0]
    print(f"question: {answer.question}")
    print(f"answer:   {answer.answer if answer.answer is not None else '(none)'}   (wrote {answer.text!r})")
    print(f"decoding steps: {answer.decoding_steps} ({answer.thought_steps} thought), FLOPs: {answer.flops:.3g}")
    print(routing_map(answer))
    path = plot_routes(answer, args.png)
    print(f"routing map: {path}")
    return 0


def cmd_report(args) -> int:
    """Rewrite every ladder or ablation summary.md under --results from its summary.json; with
    --sync also the blocks of the pages (README.md, docs/*.md) that quote them, which are
    otherwise only checked (exit 1 when one is out of step)."""
    from .report import ladder_summaries, sync_pages, write_summary

    summaries = ladder_summaries(args.results)
    for path in summaries:
        write_summary(path.parent, json.loads(path.read_text()))
    changed = sync_pages(args.results, write=args.sync)
    names = ", ".join(str(p) for p in changed)
    if args.sync:
        print(f"{len(summaries)} summaries; pages rewritten: {names or 'none (all in step)'}")
        return 0
    if changed:
        print(f"out of step with the results: {names}; `system15 report --sync` rewrites them")
        return 1
    print(f"{len(summaries)} summaries; every page in step")
    return 0


def cmd_data(args) -> int:
    from .data import write_aug_lines
    from .data import load_splits

    config = load_config(args.recipe, args.overrides)
    examples = load_splits(config)[args.split]
    write_aug_lines(examples, args.out)
    critical = sum(s.critical for e in examples for s in e.steps)
    total = sum(len(e.steps) for e in examples)
    print(f"{len(examples)} examples, {total} steps ({critical} critical) -> {args.out}")
    return 0


def cmd_speed(args) -> int:
    from .speed import DEFAULT_STEPS, default_recipe, run_speed

    recipe = args.recipe or default_recipe()
    config = load_config(recipe, args.overrides)
    summary = run_speed(config, model_dir=args.model, batch_sizes=args.batch_sizes,
                        steps=DEFAULT_STEPS if args.steps is None else args.steps, rounds=args.rounds,
                        results_root=args.results, command=_command_line(args.argv))
    for t in summary["targets"]:
        print(f"{t['target']}: {t['figure']:.3f} (bar {t['bar']}: {'met' if t['met'] else 'not met'})")
    print(f"\nwritten: {Path(args.results) / config.name / 'summary.json'}")
    return 0


def cmd_config(args) -> int:
    print("Settings (recipe keys; override with key=value):")
    print("\n".join(help_lines()))
    return 0


def _add_decoding(p: argparse.ArgumentParser) -> None:
    p.add_argument("--K", type=int, default=None, help="thought steps (default: the model's)")
    p.add_argument("--lambda-depth", type=float, default=None,
                   help="router threshold in [0, 1] for System-1.5 models (default: the model's)")
    p.add_argument("--kv-policy", choices=("fill", "skip"), default=None)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="system15", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)

    for verb, default, text in (("demo", DEMO_RECIPE, "the whole method on the built-in default task (CPU, minutes)"),
                                ("bench", None, "the whole ladder for a recipe; writes results/<name>/")):
        p = sub.add_parser(verb, help=text, epilog="\n".join(help_lines()), formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_recipe(p, default)
        p.add_argument("--runs", default="runs", help="checkpoints go to RUNS/<name>/<method>/")
        p.add_argument("--results", default="results", help="results go to RESULTS/<name>/")
        p.set_defaults(func=cmd_bench)

    p = sub.add_parser("ablate", help="retrain one rung per variant of an ablation file; writes results/<name>/")
    p.add_argument("ablation", help="ablation YAML, e.g. configs/ablations/stage1_levers.yaml")
    p.add_argument("--runs", default="runs", help="variant checkpoints go to RUNS/<recipe name>/<method>-<variant>/")
    p.add_argument("--results", default="results")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("train", help="train one method", epilog="\n".join(help_lines()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--runs", default="runs")
    _add_recipe(p, DEMO_RECIPE)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a saved model on any data file")
    p.add_argument("--model", required=True, help="a model folder, e.g. runs/demo/system15/best")
    p.add_argument("--data", required=True, help="JSON lines, GSM8K-Aug or multiplication file")
    p.add_argument("--format", choices=("gsm8k", "aug", "mult"), default=None, help="default: from the file name")
    p.add_argument("--question-field", default="question")
    p.add_argument("--answer-field", default="answer", help="a number, or text ending in '#### number'")
    _add_decoding(p)
    p.add_argument("--no-cot", action="store_true", help="answer-only decoding (K=0)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("explain", help="answer one question and show which layers each decoding step ran")
    p.add_argument("question", help='e.g. "a=6,b=6,c=a+b. c?"')
    p.add_argument("--model", required=True, help="a model folder, e.g. runs/demo/system15/best")
    _add_decoding(p)
    p.add_argument("--png", default="routes.png", help="where to write the routing map picture")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("data", help="write a task split in the GSM8K-Aug layout")
    p.add_argument("--split", default="train", choices=("train", "valid", "test"))
    p.add_argument("--out", required=True)
    _add_recipe(p, None)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("speed", help="decoding latency of forced skip patterns against the full path and HF generate; "
                                     "writes results/<name>/ (docs/speed.md)")
    _add_recipe(p, None)  # default: configs/speed.yaml
    p.add_argument("--model", default=None, help="also time a trained System-1.5 model folder's own routing")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="default: the recipe's eval.timing_batch_sizes (key=value overrides go before this option)")
    p.add_argument("--steps", type=int, default=None, help="decoding steps timed per call (default 32)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per configuration (default: the recipe's eval.timing_rounds)")
    p.add_argument("--results", default="results", help="results go to RESULTS/<name>/")
    p.set_defaults(func=cmd_speed)

    p = sub.add_parser("report", help="rewrite every results/*/summary.md; --sync: also the README and docs blocks that quote them")
    p.add_argument("--results", default="results")
    p.add_argument("--sync", action="store_true", help="rewrite the pages' blocks (else only check them: exit 1 when out of step)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("config", help="list every setting with its help")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"system15: configuration error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, CheckpointError, StaleRunError, RunLockedError) as e:
        print(f"system15: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
