"""Public entry points: :func:`compress` and :func:`restore`."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import fx

from .analysis import analyze
from .blockwise import is_blockwise
from .calibration import CalibrationStats, calibrate
from .errors import PlanError, RestoreError, RewriteError, SurgeonError, SurgeonWarning
from .passes.decompose_linear import decompose_linear
from .passes.manager import PassManager, journal_of, make_permanent, undo
from .passes.prune_compose import prune_passes
from .plan import Plan

logger = logging.getLogger(__name__)


def compress(
    gm: fx.GraphModule,
    plan: Plan | dict | str | Path,
    *,
    hard: bool = False,
    calibration: Iterable[Any] | None = None,
    stats: CalibrationStats | None = None,
    progress: Callable[[int], None] | None = None,
) -> fx.GraphModule:
    """Compress ``gm`` in place as ``plan`` specifies, and return it.

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

    Prune rules run before decomposition rules. A hard prune removes rows and
    columns and rewrites the shape constants downstream; a soft prune stores the
    compact tensors and gathers and scatters channels around them::

        >>> surgeon_fx.compress(gm, {"prune": [{"unit": "heads", "ratio": 0.25}]}, hard=True)

    ``calibration`` is an iterable of model inputs (dicts of keyword inputs, tuples
    or tensors) run once through ``gm`` to collect the input statistics that the
    ``svd-llm`` and ``asvd`` methods and budgets need; ``stats`` passes statistics
    collected before (see :func:`surgeon_fx.calibration.calibrate`). ``progress`` is
    called with the number of calibration batches done.

    Raises:
        PlanError: the plan is invalid for this model; nothing was changed.
        RewriteError: a pass failed; the graph module was rolled back.
    """
    if not isinstance(gm, fx.GraphModule):
        raise PlanError(
            f"compress() expects a torch.fx.GraphModule, got {type(gm).__name__}; "
            "call surgeon_fx.capture(model, args) first"
        )
    if is_blockwise(gm):
        raise PlanError(
            "this graph module joins the separately exported blocks of a blockwise capture and does not "
            "compute the model; compress the live model with surgeon_fx.compress_model() or "
            "CompressionSchemesManager instead"
        )
    plan = Plan.coerce(plan)
    journal = journal_of(gm)
    if journal.state == "hard":
        raise SurgeonError(
            "this graph module was hard-compressed, which is permanent; capture the original "
            "model again to apply another plan"
        )
    if journal.state == "soft":
        if hard and any(e.pass_name == "prune_channels" for e in journal.entries):
            _harden_soft_prune(gm, journal)
            logger.info("made the soft pruning permanent (%d rewrites)", len(journal.rewrites))
        elif hard:
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

    if calibration is not None:
        calibration = list(calibration)
        stats = calibrate(gm, calibration, plan.calibrated_sites(analyze(gm)), progress=progress)
    _run_plan(gm, plan, hard, stats, calibration)
    if hard:
        make_permanent(gm)
    return gm


def _run_plan(gm: fx.GraphModule, plan: Plan, hard: bool, stats, calibration: list | None) -> None:
    """Run the passes of ``plan`` on an uncompressed ``gm``, leaving them undoable."""
    analysis = analyze(gm)
    actions = plan.resolve_lrd(analysis, stats=stats)
    if plan.prune:
        PassManager(gm).run(prune_passes(plan, analysis, actions, hard=hard, stats=stats))
    elif plan.sequential:
        _decompose_sequentially(gm, actions, calibration)
    else:
        PassManager(gm).run([("decompose_linear", decompose_linear(actions, stats=stats))])
    journal = journal_of(gm)
    journal.plan = plan.to_dict()
    journal.stats = stats


def _harden_soft_prune(gm: fx.GraphModule, journal) -> None:
    """Make a soft prune hard, keeping the current (possibly fine-tuned) compact tensors.

    A soft prune stores every pruned tensor in its compact shape, under the name the
    hard prune gives it, and adds gather and scatter index buffers. So the graph is
    restored, compressed again hard with the same plan and statistics (which select
    the same channels of the original weights), and given the soft tensors. If that
    fails, the soft compression is put back with its tensors.
    """
    current = {name: tensor.detach().clone() for name, tensor in gm.state_dict().items()}
    plan, stats = Plan.coerce(journal.plan), journal.stats
    restore(gm)
    try:
        _run_plan(gm, plan, True, stats, None)
        hard_state = gm.state_dict()
        missing = [n for n, t in hard_state.items() if n not in current or current[n].shape != t.shape]
        if missing:
            raise RewriteError(f"the soft and hard forms of the plan store different tensors, such as {missing[:3]}")
        with torch.no_grad():
            for name, tensor in hard_state.items():
                tensor.copy_(current[name])
    except Exception:
        undo(gm, len(journal_of(gm).entries))
        _run_plan(gm, plan, False, stats, None)
        gm.load_state_dict(current)
        raise
    make_permanent(gm)


def _decompose_sequentially(gm: fx.GraphModule, actions: list, calibration: list | None) -> None:
    """Decompose one block at a time, calibrating it on the compressed blocks' outputs.

    Ranks were fixed beforehand on statistics of the original model, so a budget is
    allocated once. Only the factors of each block see the new inputs.
    """
    if calibration is None:
        raise PlanError("a sequential plan needs calibration=batches of model inputs")
    layers = sorted({a.site.layer for a in actions if a.site.layer is not None})
    groups = [[a for a in actions if a.site.layer == layer] for layer in layers]
    groups.append([a for a in actions if a.site.layer is None])
    manager = PassManager(gm)
    start = len(manager.journal.entries)
    try:
        for group in groups:
            todo = [a for a in group if a.rank is not None]
            if not todo:
                continue
            stats = calibrate(gm, calibration, [a.site for a in todo])
            name = f"decompose_linear[layer {todo[0].site.layer}]"
            manager.run([(name, decompose_linear(todo, stats=stats))])
    except SurgeonError:
        undo(gm, len(manager.journal.entries) - start)
        raise


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
