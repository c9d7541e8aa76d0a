"""The public API: every public symbol is documented, and every function and transform carries a
tested example (the doctests run with the suite: ``--doctest-modules``)."""

from __future__ import annotations

import importlib
import inspect
import types

import pytest

import gradtx

MODULES = ["gradtx", "gradtx.schedules", "gradtx.masks", "gradtx.sharding", "gradtx.tree",
           "gradtx.numerics", "gradtx.precision", "gradtx.quantization", "gradtx.compiler"]


def _public(module_name):
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in dir(module) if not n.startswith("_")]
    for name in names:
        obj = getattr(module, name)
        if isinstance(obj, types.ModuleType) or not callable(obj):
            continue
        if getattr(obj, "__module__", "").split(".")[0] != "gradtx":
            continue            # re-exported third-party names (typing, jax) are not ours
        yield f"{module_name}.{name}", obj


SYMBOLS = sorted({qual: obj for m in MODULES for qual, obj in _public(m)}.items())


def _is_data_container(obj) -> bool:
    """State NamedTuples: documented (their fields are the checkpoint format), but an example adds
    nothing to the example of the transform that makes them."""
    return (inspect.isclass(obj) and issubclass(obj, tuple) and hasattr(obj, "_fields")
            and obj.__name__.endswith("State"))


def test_the_public_surface_is_found():
    names = {q for q, _ in SYMBOLS}
    assert {"gradtx.adamw", "gradtx.chain", "gradtx.schedules.cosine",
            "gradtx.compiler_options"} <= names
    assert len(SYMBOLS) > 150


@pytest.mark.parametrize("qualname,obj", SYMBOLS, ids=[q for q, _ in SYMBOLS])
def test_documented_with_an_example(qualname, obj):
    doc = inspect.getdoc(obj) or ""
    assert len(doc) > 40, f"{qualname} has no real docstring"
    if not _is_data_container(obj):
        assert ">>>" in doc, f"{qualname}'s docstring has no example (a doctest)"
