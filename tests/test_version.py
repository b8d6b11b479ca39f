"""The package version (version.py) is the one the project is installed under."""

import re

import system15
from system15.version import __version__
from tests.helpers import ROOT


def test_the_version_is_the_projects():
    project = (ROOT / "pyproject.toml").read_text().split("[project]", 1)[1]
    declared = re.search(r'^version = "([^"]+)"$', project, re.MULTILINE).group(1)  # no tomllib before Python 3.11
    assert __version__ == system15.__version__ == declared
