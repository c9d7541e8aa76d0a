"""Strict numerics for every test: dtype promotion is explicit, rank promotion raises."""

import importlib
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

if os.environ.get("CI"):
    # CI draws the same hypothesis examples every run (a red build is reproducible); locally each
    # run explores new ones.
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, print_blob=True)
    settings.load_profile("ci")
    # The test extra installs every oracle and example dependency; in CI a missing one must fail
    # the run instead of silently skipping the tests that need it.
    for _module in ("optax", "torch", "flax", "orbax.checkpoint", "matplotlib", "sklearn",
                    "tqdm", "hypothesis"):
        importlib.import_module(_module)
