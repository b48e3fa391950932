"""Public entry points: :func:`compress` and :func:`restore`."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from torch import fx

from .analysis import analyze
from .errors import PlanError, RestoreError, SurgeonError, SurgeonWarning
from .passes.decompose_linear import decompose_linear
from .passes.manager import PassManager, journal_of, make_permanent, undo
from .plan import Plan

logger = logging.getLogger(__name__)


def compress(gm: fx.GraphModule, plan: Plan | dict | str | Path, *, hard: bool = False) -> fx.GraphModule:
    """Compress ``gm`` in place as ``plan`` says, and return it.

    Soft compression (``hard=False``) keeps the originals in the journal so that
    :func:`restore` gives them back bit for bit, and the new factors are trainable.
    Hard compression drops the originals. On a soft-compressed module, ``compress``
    with ``hard=False`` is a no-op (fine-tuned factors are kept) and with ``hard=True``
    makes the current compression permanent.

    Example::

        >>> gm = surgeon_fx.capture(model, (input_ids,))
        >>> surgeon_fx.compress(gm, {"lrd": [{"roles": ["mlp_down"], "rank": {"keep": 0.5}}]})
        >>> print(gm.code)   # before: aten.linear(x, w, b); after: self.layers.0.mlp.down_proj(x)
        >>> surgeon_fx.restore(gm)

    Raises:
        PlanError: the plan is invalid for this model; nothing was changed.
        RewriteError: a pass failed; the graph module was rolled back.
    """
    if not isinstance(gm, fx.GraphModule):
        raise PlanError(
            f"compress() expects a torch.fx.GraphModule, got {type(gm).__name__}; "
            "call surgeon_fx.capture(model, args) first"
        )
    plan = Plan.coerce(plan)
    journal = journal_of(gm)
    if journal.state == "hard":
        raise SurgeonError(
            "this graph module was hard-compressed, which is permanent; capture the original "
            "model again to apply another plan"
        )
    if journal.state == "soft":
        if hard:
            make_permanent(gm)
            logger.info("made the soft compression permanent (%d rewrites)", len(journal.rewrites))
        else:
            warnings.warn(
                "graph module is already soft-compressed; compress() did nothing and kept the "
                "current factors. Call surgeon_fx.restore(gm) first to apply a new plan",
                SurgeonWarning,
                stacklevel=2,
            )
        return gm

    analysis = analyze(gm)
    actions = plan.resolve_lrd(analysis)
    PassManager(gm).run([("decompose_linear", decompose_linear(actions))])
    journal.plan = plan.to_dict()
    if hard:
        make_permanent(gm)
    return gm


def restore(gm: fx.GraphModule) -> fx.GraphModule:
    """Undo every soft compression of ``gm`` in place and return it.

    Afterwards ``gm.code`` equals the code before :func:`compress`, and every
    parameter and buffer is the original tensor under its original name.

    Raises:
        RestoreError: the compression was hard, which is permanent.
    """
    journal = journal_of(gm)
    if journal.state == "hard":
        raise RestoreError(
            "cannot restore: this graph module was hard-compressed, which drops the originals; "
            "compress with hard=False to keep them, or reload the original model"
        )
    undo(gm, len(journal.entries))
    journal.plan = None
    return gm
