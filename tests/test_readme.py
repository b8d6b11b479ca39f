"""What the README tells a user must be true: its commands, its recipes, its numbers."""

import json
import re
from pathlib import Path

import pytest

from system15.config import load_config
from system15.report import markdown_table

from conftest import ROOT

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


def test_readme_numbers_come_from_the_results_files():
    """Each results table in the README is the table of the summary.json it names."""
    quoted = re.findall(r"<!-- results: (\S+) -->\n(.*?)\n<!-- /results -->", README, re.S)
    assert quoted, "the README quotes no results"
    for path, table in quoted:
        summary = json.loads((ROOT / path).read_text())
        assert table.strip() == markdown_table(summary["rows"]).strip(), path
        assert summary["command"] in README, f"the command that regenerates {path} is not in the README"


def test_readme_figures_exist():
    for figure in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", README):
        assert (ROOT / figure).exists(), figure
