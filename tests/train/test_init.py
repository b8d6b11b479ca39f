"""The table of methods (train/__init__.py): every method of the config has its Objective,
and an unknown name is refused with the choices."""

import pytest

from system15.config import METHODS
from system15.train import METHOD_CLASSES, Objective, objective_class, objective_for
from tests.helpers import tiny_config


def test_every_method_has_an_objective_of_its_own_name():
    assert set(METHOD_CLASSES) == set(METHODS)
    config = tiny_config()
    for method in METHODS:
        objective = objective_for(method, config)
        assert isinstance(objective, objective_class(method)) and isinstance(objective, Objective)
        assert objective.name == method


def test_an_unknown_method_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown method 'cott'; choose from \['coconut', 'cot', 'latent', "):
        objective_class("cott")
