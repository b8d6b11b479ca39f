"""The package root (system15/__init__.py): the API it names, loaded on first use, so that
`import system15` and the data layer need no torch."""

import subprocess
import sys

import pytest

import system15
from system15 import api
from tests.helpers import ROOT, child_env


def test_the_api_is_loaded_on_first_use_and_the_data_layer_needs_no_torch():
    script = ("import sys, system15, system15.data\n"
              "print(sorted(m for m in ('torch', 'transformers', 'system15.api') if m in sys.modules))\n"
              "system15.load\n"
              "print('system15.api' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=child_env(), cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "True"]


def test_the_root_names_the_api_and_nothing_else():
    assert (system15.load, system15.fit, system15.load_config) == (api.load, api.fit, api.load_config)
    assert set(system15.__all__) == {"__version__", "load", "fit", "load_config"}
    with pytest.raises(AttributeError, match="module 'system15' has no attribute 'train_everything'"):
        system15.train_everything
