"""The engine runs a method's own training program through its config, never by the method's name."""

from __future__ import annotations

from typing import ClassVar, Literal

import pytest

from nmrestore.engine.runner import training_program
from nmrestore.errors import RecipeError
from nmrestore.methods import ClassPruningConfig, PNGConfig, SLSConfig
from nmrestore.methods.classpruning.program import train_adaptive
from nmrestore.methods.png.program import train_png
from nmrestore.sparsity.api import NMConfig


def test_configs_name_their_programs() -> None:
    assert training_program(ClassPruningConfig(m=4, routes=(1, 2, 4))) is train_adaptive
    assert training_program(PNGConfig(m=4, ns=(2, 1))) is train_png
    assert training_program(SLSConfig(m=4, budget=0.5)) is None  # the plain Trainer loop
    assert training_program(NMConfig()) is None
    assert training_program(None) is None


def test_a_program_that_does_not_exist_is_a_recipe_error() -> None:
    class Broken(NMConfig):
        method: Literal["nm"] = "nm"
        training_program: ClassVar[str | None] = "nmrestore.engine.runner:no_such_program"

    with pytest.raises(RecipeError, match="no_such_program"):
        training_program(Broken())
