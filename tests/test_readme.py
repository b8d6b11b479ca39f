"""What the README tells a user must be true: its commands, its recipes, its numbers."""

import json
import re
from pathlib import Path

import pytest

from system15.config import load_config
from system15.report import COMPACT, markdown_table, notes, with_budget

from tests.helpers import ROOT

README = (ROOT / "README.md").read_text()


def fenced_commands():
    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", README, re.S)
            for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_the_readmes_test_command():
    test_command = next(c for c in fenced_commands() if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command.split("&& ", 2)[2] in ci  # the install + pytest part, after venv creation


def test_readme_opens_with_two_commands_install_and_demo():
    commands = fenced_commands()
    assert commands[0].endswith("system15 demo") and "pip install" in commands[0]
    assert "pytest" in commands[1]


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_recipe_loads(recipe):
    config = load_config(ROOT / "configs" / recipe)
    assert config.name


def test_readme_is_a_front_page_that_links_every_docs_page():
    assert len(README.encode()) <= 10 * 1024
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in README, page


def test_the_readmes_python_api_snippet_runs(tmp_path, monkeypatch, examples):
    """The snippet as printed, against a model folder where it says one is."""
    from tests.helpers import tiny_model

    model = tiny_model(examples, shortcuts=True)
    model.method, model.spec.K = "system15", 2
    model.save(tmp_path / "runs" / "demo" / "system15" / "best")
    monkeypatch.chdir(tmp_path)
    snippet = re.search(r"## Python API\n\n```python\n(.*?)```", README, re.S).group(1)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    answer = namespace["out"][0]
    assert answer.decoding_steps == len(answer.routes) and answer.routes[0].kind == "thought"


def test_the_readmes_own_data_recipe_and_lines_read_as_documented(tmp_path, monkeypatch):
    from system15.data import read_examples

    recipe = re.search(r"```yaml\n(.*?)```", README, re.S).group(1)
    lines = re.search(r"```json\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for name in ("train", "test"):
        (tmp_path / "data" / f"{name}.jsonl").write_text(lines)
    (tmp_path / "my.yaml").write_text(recipe)
    config = load_config(tmp_path / "my.yaml")
    assert (config.backbone.source, config.task.name, config.task.train) == ("hf", "files", "data/train.jsonl")
    first, second = read_examples(tmp_path / "data" / "train.jsonl")
    assert [s.critical for s in first.steps] == [False, True] and first.answer == "11"
    assert [s.critical for s in second.steps] == [False, True] and [s.result for s in second.steps] == ["8", "11"]


def pages_quoting_results():
    from system15.report import pages

    return pages(ROOT)


@pytest.mark.parametrize("page", [p.relative_to(ROOT).as_posix() for p in pages_quoting_results()])
def test_page_numbers_come_from_the_results_files(page):
    """Each results table on a page (the README, docs/*.md) is the table of the summary.json
    it names, and each notes block what summary.md says below that table; the command that
    regenerates it is on the same page."""
    text = (ROOT / page).read_text()
    for kind, columns in (("results", None), ("compact", COMPACT)):
        for path, table in re.findall(rf"<!-- {kind}: (\S+) -->\n(.*?)\n<!-- /{kind} -->", text, re.S):
            summary = json.loads((ROOT / path).read_text())
            assert table.strip() == markdown_table(with_budget(summary), columns).strip(), path
            assert summary["command"] in text, f"the command that regenerates {path} is not on {page}"
    for path, body in re.findall(r"<!-- notes: (\S+) -->\n(.*?)\n<!-- /notes -->", text, re.S):
        assert body == "\n\n".join(notes(json.loads((ROOT / path).read_text()))), path


def test_every_results_folder_is_named_on_a_page():
    text = "".join(page.read_text() for page in pages_quoting_results())
    orphans = [p.parent.name for p in (ROOT / "results").glob("*/summary.json") if f"results/{p.parent.name}/" not in text]
    assert orphans == [], "results that no page names"


@pytest.mark.parametrize("page", [p.relative_to(ROOT).as_posix() for p in pages_quoting_results()])
def test_page_figures_and_links_exist(page):
    """Every figure and every relative link on a page points at a file that exists."""
    text = (ROOT / page).read_text()
    targets = re.findall(r"\]\(([^)#\s]+)\)", text)
    for target in targets:
        if "://" not in target:
            assert ((ROOT / page).parent / target).exists(), f"{page}: {target}"


def test_report_sync_keeps_the_pages_tables_in_step_and_a_run_does_not_touch_them(tmp_path, monkeypatch):
    """A results command writes its summary only; `system15 report --sync` rewrites the
    tables of that summary on every page that quotes it (the README, docs/*.md), and nothing
    else; without --sync it only says which pages are out of step."""
    from system15.cli import main
    from system15.report import write_summary

    readme = tmp_path / "README.md"
    other = "<!-- results: elsewhere/summary.json -->\n| old |\n<!-- /results -->"
    readme.write_text(f"# title\n\n<!-- results: results/out/summary.json -->\n| stale |\n<!-- /results -->\n\nprose\n\n"
                      f"{other}\n<!-- compact: results/out/summary.json -->\n| stale |\n<!-- /compact -->\n")
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "levers.md"
    doc.write_text("# levers\n\n<!-- results: results/out/summary.json -->\n| stale |\n<!-- /results -->\n")
    rows = [{"method": "cot", "accuracy": 0.5, "decoding_steps": 3.0, "train_steps": 10}]
    summary = {"task": "t", "backbone": "b", "device": "d", "command": "c", "rows": rows}
    monkeypatch.chdir(tmp_path)  # results commands run from the repository root; paths match as the README writes them
    before = readme.read_text()
    write_summary("results/out", summary)
    assert readme.read_text() == before, "a run writes its results, not the pages"
    assert main(["report"]) == 1 and readme.read_text() == before
    assert main(["report", "--sync"]) == 0
    text = readme.read_text()
    assert f"<!-- results: results/out/summary.json -->\n{markdown_table(rows)}\n<!-- /results -->\n\nprose\n" in text
    assert "| stale |" not in text and other in text and text.startswith("# title\n")
    compact = markdown_table(rows, COMPACT)
    assert "training steps" not in compact and f"<!-- compact: results/out/summary.json -->\n{compact}\n<!-- /compact -->" in text
    assert doc.read_text() == (f"# levers\n\n<!-- results: results/out/summary.json -->\n{markdown_table(rows)}\n"
                               "<!-- /results -->\n")
    assert main(["report"]) == 0


def test_report_sync_keeps_the_readme_notes_in_step(tmp_path, monkeypatch):
    """The notes block is rewritten with what summary.md says below its table, also when
    the README's block is still empty; the prose around it is left alone."""
    from system15.report import sync_pages, write_summary

    readme = tmp_path / "README.md"
    readme.write_text("<!-- notes: results/out/summary.json -->\n<!-- /notes -->\n\nprose 1.23x\n")
    rows = [{"method": "cot", "accuracy": 0.9}, {"method": "latent", "accuracy": 0.5}]
    summary = {"task": "t", "backbone": "b", "device": "d", "command": "c", "rows": rows,
               "stage1_align": {"segment": 0.25, "chosen": "segment"}}
    monkeypatch.chdir(tmp_path)
    write_summary("results/out", summary)
    assert sync_pages() == [Path("README.md")]
    text = readme.read_text()
    said = "\n\n".join(notes(summary))
    assert "segment: 25.0%" in said and "50.0% against 81.0%" in said
    assert text == f"<!-- notes: results/out/summary.json -->\n{said}\n<!-- /notes -->\n\nprose 1.23x\n"
    assert said in (tmp_path / "results" / "out" / "summary.md").read_text()
