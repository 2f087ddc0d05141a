"""Docstring examples on the public API run and say what they print."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import mtp

MODULES = sorted(m.name for m in pkgutil.walk_packages(mtp.__path__, "mtp."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
