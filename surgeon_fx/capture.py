"""Capture: turn a model into a ``torch.fx.GraphModule``.

Order of attempts:

1. A ``GraphModule`` passed in is returned as is (shapes are propagated onto it
   when example inputs are given and its nodes carry none).
2. ``torch.export.export(model, args, kwargs, strict=False)`` with the batch and
   sequence dimensions marked dynamic, then ``ExportedProgram.module()``. Where
   such a dimension has size 1, the export runs on inputs repeated to size 2,
   because export would fix a size-1 dimension. If the dynamic export fails, a
   static export is tried.
3. Blockwise capture (:mod:`surgeon_fx.blockwise`) for a model with repeated
   blocks that does not export whole: each block is exported alone from the
   inputs it received in one eager run, and the graphs are joined for analysis.
4. ``torch.fx.symbolic_trace(model)`` for plain modules that export rejects.

A blockwise capture returns a *joined graph*: one graph module with the graphs of
all exported parts side by side, whose parameters are the model's own at their full
module paths. Its ``meta["surgeon_fx_blockwise"]`` is a
:class:`~surgeon_fx.blockwise.BlockwiseCapture`: one ``CapturedPart(path, stack,
gm)`` per exported block or other module with linear layers, the modules it skipped
with the reason, and why whole-model capture was not used. The joined graph is for
analysis and for compressing the live model; it does not compute the model.

``strategy="whole"`` skips step 3, and ``strategy="blockwise"`` goes to step 3
directly. The log (logger ``surgeon_fx.capture``, level INFO) names the strategy
used and why.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.fx.passes.shape_prop import ShapeProp

from .blockwise import capture_blockwise, export_quietly, find_stacks
from .errors import CaptureError

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "whole", "blockwise")


def capture(
    model: nn.Module, args: Any = (), kwargs: dict | None = None, *, dynamic: bool = True, strategy: str = "auto"
) -> fx.GraphModule:
    """Return ``model`` as a graph module whose linear nodes keep their module paths.

    Args:
        model: an ``nn.Module`` (a Hugging Face model or your own) or a ``GraphModule``.
        args: example positional inputs, a tuple or a single tensor.
        kwargs: example keyword inputs. A Hugging Face model is captured with
            ``config.use_cache`` set to False (and reset afterwards), so the graph
            returns no KV cache and takes no ``use_cache`` input.
        dynamic: mark dimensions 0 and 1 of every example tensor (batch and
            sequence) dynamic, so the graph runs at other sizes. A blockwise
            capture is always static.
        strategy: ``"auto"`` (whole model, then blockwise, then symbolic tracing),
            ``"whole"`` (never blockwise) or ``"blockwise"``. A blockwise capture
            returns a joined graph for analysis that does not compute the model;
            compress the live model with :func:`surgeon_fx.compress_model`.

    Raises:
        CaptureError: ``model`` is not a module, ``strategy`` is unknown, the
            forward raises on the example inputs, or no strategy can capture it.
    """
    if strategy not in STRATEGIES:
        raise CaptureError(f"unknown capture strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    if isinstance(args, torch.Tensor):
        args = (args,)
    args = tuple(args)
    kwargs = dict(kwargs or {})
    if isinstance(model, fx.GraphModule):
        if args and not _has_shapes(model):
            _propagate_shapes(model, args)
        return model
    if not isinstance(model, nn.Module):
        raise CaptureError(
            f"capture() expects a torch.nn.Module, got {type(model).__name__}; "
            "pass the model object itself, not its output or state_dict"
        )
    blockwise_error = None
    with _cache_disabled(model):
        if strategy == "blockwise":
            return capture_blockwise(model, args, kwargs, reason="strategy='blockwise' was requested")
        check_forward_runs(model, args, kwargs)
        try:
            return _export(model, args, kwargs, dynamic)
        except Exception as err:  # noqa: BLE001 - any export failure falls through to tracing
            export_error = err
            logger.info("torch.export failed for %s: %s", type(model).__name__, _first_line(err))
        if strategy == "auto" and find_stacks(model):
            reason = f"whole-model torch.export failed with {type(export_error).__name__}: {_first_line(export_error)}"
            try:
                return capture_blockwise(model, args, kwargs, reason=reason)
            except CaptureError as err:
                blockwise_error = err
                logger.info("blockwise capture of %s failed: %s", type(model).__name__, err)

    try:
        gm = fx.symbolic_trace(model)
    except Exception as trace_error:  # noqa: BLE001
        raise CaptureError(
            f"cannot capture {type(model).__name__}: torch.export.export failed with "
            f"{type(export_error).__name__}: {_first_line(export_error)}; "
            f"torch.fx.symbolic_trace failed with {type(trace_error).__name__}: "
            f"{_first_line(trace_error)}"
            f"{'' if blockwise_error is None else f'; blockwise capture failed: {blockwise_error}'}. "
            "Data-dependent control flow (an `if` on a tensor's value) is the usual cause: "
            "rewrite it with torch.cond, or hold the repeated blocks in an nn.ModuleList so "
            "that blockwise capture can export them one by one"
        ) from export_error
    logger.info("captured %s with torch.fx.symbolic_trace", type(model).__name__)
    if args:
        _propagate_shapes(gm, args)
    return gm


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> fx.GraphModule:
    with _fastpath_disabled():
        if dynamic:
            # Widen batch and sequence first, then only the batch if a size-1 sequence
            # dimension turns out to broadcast.
            for dims in ((0, 1), (0,)):
                gm = _export_widened(model, args, kwargs, dims)
                if gm is not None:
                    return gm
            try:
                program = export_quietly(
                    model, args, kwargs=kwargs, dynamic_shapes=_dynamic_shapes(model, args, kwargs), strict=False
                )
                logger.info("captured %s with torch.export (dynamic batch and sequence)", type(model).__name__)
                return program.module()
            except Exception as err:  # noqa: BLE001
                if _data_dependent(err):
                    raise
                logger.info("dynamic export failed (%s); trying static shapes", _first_line(err))
        program = export_quietly(model, args, kwargs=kwargs, strict=False)
    logger.info("captured %s with torch.export (static shapes)", type(model).__name__)
    return program.module()


def _export_widened(model: nn.Module, args: tuple, kwargs: dict, dims: tuple[int, ...]) -> fx.GraphModule | None:
    """Export on the example inputs repeated to size 2 where a dimension in ``dims`` has size 1.

    torch.export specialises a dimension of size 1 to that constant, so an example
    batch of one sentence would give a graph that runs only at batch size 1. Returns
    ``None`` when no dimension has size 1, or when the export fails or its graph
    rejects the original inputs (a size-1 dimension that broadcasts, for example).
    """
    wide_args, wide_kwargs = _widen(args, dims), _widen(kwargs, dims)
    if not _differs(args, wide_args) and not _differs(kwargs, wide_kwargs):
        return None
    try:
        program = export_quietly(
            model, wide_args, kwargs=wide_kwargs,
            dynamic_shapes=_dynamic_shapes(model, wide_args, wide_kwargs), strict=False,
        )
        gm = program.module()
        with torch.no_grad():
            gm(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - fall back to the example inputs as given
        if _data_dependent(err):
            raise
        logger.info("export on inputs widened to size 2 along dimensions %s failed (%s)", dims, _first_line(err))
        return None
    logger.info("captured %s with torch.export (dynamic batch and sequence, traced at size 2)", type(model).__name__)
    return gm


def _widen(value: Any, dims: tuple[int, ...]) -> Any:
    if isinstance(value, torch.Tensor):
        for dim in dims:
            if dim < value.dim() and value.shape[dim] == 1:
                value = torch.cat([value, value], dim=dim)  # (.., 1, ..) -> (.., 2, ..)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_widen(v, dims) for v in value)
    if isinstance(value, dict):
        return {k: _widen(v, dims) for k, v in value.items()}
    return value


def _differs(value: Any, widened: Any) -> bool:
    return any(a is not b for a, b in zip(torch.utils._pytree.tree_leaves(value), torch.utils._pytree.tree_leaves(widened)))


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict | tuple:
    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {d: Dim.AUTO for d in range(min(value.dim(), 2))} or None
        return None

    # torch.export reads a tuple of specs in the order of forward's signature, not
    # in the order the caller wrote the keyword arguments, so name each input.
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return tuple(_spec_tree(a, spec) for a in args) + tuple(_spec_tree(v, spec) for v in kwargs.values())
    return {name: _spec_tree(value, spec) for name, value in bound.arguments.items()}


def _spec_tree(value: Any, spec) -> Any:
    if isinstance(value, torch.Tensor):
        return spec(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_spec_tree(v, spec) for v in value)
    if isinstance(value, dict):
        return {k: _spec_tree(v, spec) for k, v in value.items()}
    return None


class _cache_disabled:
    """Set ``model.config.use_cache`` to False while capturing.

    A KV cache object in the output cannot be exported, and compression does not
    need it.
    """

    def __init__(self, model: nn.Module) -> None:
        self.config = getattr(model, "config", None)
        self.previous = getattr(self.config, "use_cache", None)

    def __enter__(self) -> None:
        if self.previous:
            self.config.use_cache = False

    def __exit__(self, *exc: object) -> None:
        if self.previous:
            self.config.use_cache = self.previous


def check_forward_runs(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Run ``model`` once on the example inputs, raising CaptureError if it fails."""
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as err:  # noqa: BLE001
        raise CaptureError(
            f"the forward of {type(model).__name__} raised {type(err).__name__}: "
            f"{_first_line(err)}; check that args and kwargs are inputs the model accepts"
        ) from err


def _has_shapes(gm: fx.GraphModule) -> bool:
    return any("val" in n.meta or "tensor_meta" in n.meta for n in gm.graph.nodes if n.op == "call_function")


def _propagate_shapes(gm: fx.GraphModule, args: tuple) -> None:
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    except Exception as err:  # noqa: BLE001
        raise CaptureError(
            f"running the graph module on the example inputs failed with "
            f"{type(err).__name__}: {_first_line(err)}"
        ) from err


class _fastpath_disabled:
    """Turn off the fused ``nn.TransformerEncoderLayer`` fast path while tracing."""

    def __enter__(self) -> None:
        self._previous = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)

    def __exit__(self, *exc: object) -> None:
        torch.backends.mha.set_fastpath_enabled(self._previous)


def _data_dependent(err: BaseException) -> bool:
    """Return True if export failed on control flow that depends on tensor values.

    Such a failure does not depend on which dimensions are dynamic, so trying other
    shape settings would only repeat it.
    """
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    return isinstance(err, GuardOnDataDependentSymNode)


def _first_line(err: BaseException | None) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else repr(err)
