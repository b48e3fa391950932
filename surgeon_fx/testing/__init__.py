"""Property-based checks that compression and restore are safe on a given model.

:func:`check_invariants` runs every invariant (see
:mod:`surgeon_fx.testing.invariants`) on one model and plan and raises an
``AssertionError`` naming the invariant and the site that broke it. It needs
neither pytest nor Hypothesis.

The Hypothesis strategies :func:`transformer_configs`, :func:`plans` and
:func:`invalid_plans`, and :func:`register_profiles`, load on first use and need
``pip install hypothesis``.

Example::

    >>> from surgeon_fx.testing import check_invariants
    >>> check_invariants(model, (input_ids,), plan={"lrd": [{"roles": ["mlp_down"], "rank": 4}]})
"""

from __future__ import annotations

from typing import Any

from .families import FAMILIES, ModelSpec, build_model
from .invariants import (
    INVARIANTS,
    InvariantError,
    check_full_rank,
    check_invariants,
    check_plan,
    check_rejected,
    check_roles,
    default_plan,
)
from .predict import predict_num_params, predict_sites

_STRATEGIES = ("invalid_plans", "plans", "register_profiles", "transformer_configs")

__all__ = [
    "FAMILIES",
    "INVARIANTS",
    "InvariantError",
    "ModelSpec",
    "build_model",
    "check_full_rank",
    "check_invariants",
    "check_plan",
    "check_rejected",
    "check_roles",
    "default_plan",
    "predict_num_params",
    "predict_sites",
    *_STRATEGIES,
]


def __getattr__(name: str) -> Any:
    """Import the Hypothesis strategies on first access."""
    if name not in _STRATEGIES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from . import strategies
    except ModuleNotFoundError as err:
        if err.name != "hypothesis":
            raise
        raise ImportError(
            f"surgeon_fx.testing.{name} needs Hypothesis, which is not installed; "
            "run `pip install hypothesis` (or `pip install surgeon-fx[test]`)"
        ) from err
    return getattr(strategies, name)
