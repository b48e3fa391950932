"""Blockwise capture: export each repeated block of a model on its own.

Some models do not export whole. Qwen2.5-VL's vision tower, for example, computes
its attention windows from the values of the image grid, and ``torch.export``
cannot trace control flow that depends on tensor values. Each of its blocks,
though, exports alone once its inputs are known. Blockwise capture works like this:

1. Find the *stacks*: every ``nn.ModuleList`` whose children all have one class and
   contain a linear layer (``model.visual.blocks``, ``model.language_model.layers``).
   Their children are the *blocks*. Find the *other parts*: the largest modules
   that contain a linear layer but no stack (a patch merger, an output head).
2. Put a forward pre-hook (``with_kwargs=True``) on every block and other part, run
   the model once eagerly on the example inputs, and record each one's first call.
3. Export each recorded part with ``torch.export.export(part, args, kwargs,
   strict=False)``. The part is exported inside a wrapper that keeps it at its
   module path, so every parameter target and ``nn_module_stack`` entry in the
   graph is a full path such as ``model.visual.blocks.0.attn.qkv``.
4. Join the parts' graphs into one graph module, the *joined graph*, which the
   analysis reads like any captured graph.

Data structure: :class:`BlockwiseCapture` holds one :class:`CapturedPart` per
exported part (its module path, its stack prefix or ``None``, and its own graph
module), the parts that were skipped with the reason, and the reason whole-model
capture was not used. The joined graph stores it in
``gm.meta["surgeon_fx_blockwise"]``. In the joined graph, each part's inputs are
placeholders tagged with ``meta["surgeon_fx_part"]``. The outputs of all parts form
one tuple. Parameters are the live model's own tensors, and constants that export
lifted out of a part live under ``_blockwise_constants.<part index>``.

The joined graph describes the model but does not compute it, because the code
between the parts (window indexing, the merge of image features into the text)
is not in it. Use it to analyse the model and to compress the live model with
:func:`surgeon_fx.compress_model` or :class:`surgeon_fx.CompressionSchemesManager`,
which swap the live model's submodules at the sites' paths.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

from ._fx_utils import fetch_attr
from .errors import CaptureError, SurgeonWarning

logger = logging.getLogger(__name__)

BLOCKWISE_META = "surgeon_fx_blockwise"
PART_META = "surgeon_fx_part"
_CONSTANTS = "_blockwise_constants"


@dataclass
class CapturedPart:
    """One exported part of a model.

    ``stack`` is the prefix of the repeated stack that contains the part
    (``model.visual.blocks``), or ``None`` for another module with linear layers.
    """

    path: str
    stack: str | None
    gm: fx.GraphModule = field(repr=False)


@dataclass
class BlockwiseCapture:
    """The parts of a blockwise capture, those that were skipped, and why it was used."""

    parts: list[CapturedPart]
    skipped: dict[str, str]  # module path -> why it was not exported
    reason: str

    @property
    def stacks(self) -> list[str]:
        """Prefixes of the captured repeated stacks, in call order."""
        return list(dict.fromkeys(p.stack for p in self.parts if p.stack is not None))


def is_blockwise(gm: Any) -> bool:
    """Return True if ``gm`` is the joined graph of a blockwise capture."""
    return isinstance(gm, fx.GraphModule) and BLOCKWISE_META in gm.meta


def find_stacks(model: nn.Module) -> list[str]:
    """Return the paths of the repeated stacks of ``model`` (see the module docstring)."""
    stacks: list[str] = []
    for path, module in model.named_modules():
        if not path or not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(path.startswith(f"{stack}.") for stack in stacks):
            continue
        if len({type(child) for child in module}) == 1 and all(_has_linear(child) for child in module):
            stacks.append(path)
    return stacks


def capture_blockwise(model: nn.Module, args: tuple, kwargs: dict, *, reason: str) -> fx.GraphModule:
    """Capture ``model`` part by part and return the joined graph (see the module docstring).

    Raises:
        CaptureError: ``model`` has no repeated stack, its forward raises on the
            example inputs, or no part exports.
    """
    stacks = find_stacks(model)
    if not stacks:
        raise CaptureError(
            f"blockwise capture of {type(model).__name__} found no repeated blocks (an nn.ModuleList of "
            "modules of one class with linear layers); capture the model whole instead"
        )
    targets = {f"{stack}.{name}": stack for stack in stacks for name, _ in model.get_submodule(stack).named_children()}
    targets.update({path: None for path in _other_parts(model, stacks)})
    calls = _record_calls(model, targets, args, kwargs)
    parts, skipped = [], {}
    for path, (part_args, part_kwargs) in calls.items():
        try:
            gm = _export_part(model.get_submodule(path), path, part_args, part_kwargs)
        except Exception as err:  # noqa: BLE001 - a part that does not export is skipped and reported
            skipped[path] = f"export and real tracing failed with {type(err).__name__}: {_first_line(err)}"
            continue
        parts.append(CapturedPart(path, targets[path], gm))
    skipped.update({path: "not called on the example inputs" for path in targets if path not in calls})
    if not any(part.stack is not None for part in parts):
        raise CaptureError(
            f"blockwise capture of {type(model).__name__} exported no block of the stacks {stacks}: "
            f"{next(iter(skipped.values()), 'no block ran')}"
        )
    _report_skipped(model, skipped)
    capture = BlockwiseCapture(parts, skipped, reason)
    logger.info(
        "captured %s blockwise: %d blocks of the stacks %s and %d other parts, because %s",
        type(model).__name__, sum(p.stack is not None for p in parts), capture.stacks,
        sum(p.stack is None for p in parts), reason,
    )
    return join_parts(capture)


def join_parts(capture: BlockwiseCapture) -> fx.GraphModule:
    """Return one graph module that contains the graphs of all ``capture.parts``, side by side."""
    graph = fx.Graph()
    attributes: dict[str, Any] = {}
    outputs = []
    for index, part in enumerate(capture.parts):
        copies: dict[fx.Node, fx.Node] = {}
        outputs.append(graph.graph_copy(part.gm.graph, copies))
        for old, new in copies.items():
            if new.op == "placeholder":
                new.target = new.name  # the generated forward needs distinct argument names
                new.meta[PART_META] = part.path
            elif new.op == "call_module" and old.target.startswith("_guards_fn") and not new.users:
                graph.erase_node(new)  # export's check of the example's shapes, not model code
            elif new.op in ("get_attr", "call_module"):
                new.target = _joined_target(old.target, part.path, index)
                attributes[new.target] = fetch_attr(part.gm, old.target)
    graph.output(tuple(outputs))
    gm = fx.GraphModule(attributes, graph, class_name="BlockwiseGraphModule")
    gm.meta[BLOCKWISE_META] = capture
    return gm


def _joined_target(target: str, path: str, index: int) -> str:
    # Parameters keep their full path in the model; lifted constants and helper
    # submodules (such as export's guard function) get a per-part namespace.
    if target.startswith(f"{path}."):
        return target
    return f"{_CONSTANTS}.{index}.{target}"


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" for m in module.modules())


def _other_parts(model: nn.Module, stacks: list[str]) -> list[str]:
    """Return the largest submodules that contain a linear layer but no stack."""
    found = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if path in stacks:
                continue
            if any(stack.startswith(f"{path}.") for stack in stacks):
                visit(path, child)
            elif _has_linear(child):
                found.append(path)

    visit("", model)
    return found


def _record_calls(model: nn.Module, targets: dict, args: tuple, kwargs: dict) -> dict[str, tuple[tuple, dict]]:
    """Run ``model`` once and return the inputs of the first call of each target, in call order."""
    calls: dict[str, tuple[tuple, dict]] = {}

    def recorder(path: str):
        def hook(module: nn.Module, hook_args: tuple, hook_kwargs: dict) -> None:
            # A KV cache is state, not an input the block's graph needs, and export rejects it.
            recorded = {name: None if _is_cache(value) else value for name, value in hook_kwargs.items()}
            calls.setdefault(path, (hook_args, recorded))

        return hook

    handles = [
        model.get_submodule(path).register_forward_pre_hook(recorder(path), with_kwargs=True) for path in targets
    ]
    from .capture import check_forward_runs  # capture imports this module

    try:
        check_forward_runs(model, args, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _is_cache(value: Any) -> bool:
    return any(cls.__name__ == "Cache" for cls in type(value).__mro__)


class _AtPath(nn.Module):
    """Wrapper that registers ``module`` at ``path`` below itself, so that export records full paths."""

    def __init__(self, module: nn.Module, path: str) -> None:
        super().__init__()
        parent: nn.Module = self
        *parents, name = path.split(".")
        for part in parents:
            child = nn.Module()
            parent.add_module(part, child)
            parent = child
        parent.add_module(name, module)
        self.path = path

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_submodule(self.path)(*args, **kwargs)


def _export_part(module: nn.Module, path: str, args: tuple, kwargs: dict) -> fx.GraphModule:
    """Export one part; if export fails, trace it on the real example inputs instead."""
    # NOTE: parts are captured with static shapes because the joined graph is only
    # analysed; the live model, not this graph, runs at other sizes.
    wrapper = _AtPath(module, path)
    try:
        return export_quietly(wrapper, args, kwargs=kwargs, strict=False).module()
    except Exception as err:  # noqa: BLE001 - retried below
        logger.info("torch.export of %s failed (%s); tracing it on the example inputs", path, _first_line(err))
    return _trace_real(wrapper, args, kwargs)


def _trace_real(wrapper: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    """Trace ``wrapper`` with ``make_fx`` on real tensors, with parameters as named ``get_attr`` nodes.

    Real tracing takes every data-dependent value (a ``.tolist()`` of attention
    window lengths, say) from the example, which export cannot do. Parameters and
    buffers enter as inputs through ``torch.func.functional_call`` and become
    ``get_attr`` nodes at their full paths afterwards.
    """
    tensors = {**dict(wrapper.named_parameters()), **dict(wrapper.named_buffers())}
    names = list(tensors)

    def run(values: list, *inputs: Any) -> Any:
        return torch.func.functional_call(wrapper, dict(zip(names, values)), inputs, kwargs)

    with torch.no_grad():
        # pre_dispatch keeps aten.linear whole instead of decomposing it to t + addmm.
        traced = make_fx(run, tracing_mode="real", pre_dispatch=True)(list(tensors.values()), *args)
    attributes = {target: fetch_attr(traced, target) for target in _attribute_targets(traced.graph)}
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"][: len(names)]
    for name, node in zip(names, placeholders):
        with traced.graph.inserting_before(node), warnings.catch_warnings():
            # The parameter is not on ``traced`` yet, but the GraphModule built below registers it.
            warnings.simplefilter("ignore", UserWarning)
            replacement = traced.graph.get_attr(name)
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        traced.graph.erase_node(node)
        attributes[name] = tensors[name]
    # NOTE: nodes keep their real example outputs in meta["val"], so tracing a large
    # block this way keeps all of its activations until the capture is dropped.
    return fx.GraphModule(attributes, traced.graph)


def _attribute_targets(graph: fx.Graph) -> list[str]:
    return [n.target for n in graph.nodes if n.op in ("get_attr", "call_module")]


def export_quietly(model: nn.Module, args: tuple, **options: Any) -> torch.export.ExportedProgram:
    """Call ``torch.export.export``, moving the partial graph of a failed trace to the debug log.

    torch 2.13 prints that graph to stderr before it raises, which would bury a user's
    console under every failed attempt. Other text written to stderr is passed on.
    """
    buffer = io.StringIO()
    graph = None
    try:
        with contextlib.redirect_stderr(buffer):
            return torch.export.export(model, args, **options)
    except Exception as err:
        graph = getattr(err, "partial_fx_graph", None)
        raise
    finally:
        text = buffer.getvalue()
        if graph is not None:
            text = text.replace(f"{graph}\n", "")  # torch 2.13 prints it twice
            logger.debug("partial graph of the failed torch.export of %s:\n%s", type(model).__name__, graph)
        sys.stderr.write(text)


def _report_skipped(model: nn.Module, skipped: dict[str, str]) -> None:
    if not skipped:
        return
    for path, why in skipped.items():
        logger.info("blockwise capture of %s skipped %s: %s", type(model).__name__, path, why)
    warnings.warn(
        f"blockwise capture of {type(model).__name__} skipped {len(skipped)} modules, whose linear layers "
        f"cannot be compressed: {', '.join(sorted(skipped)[:5])}{' ...' if len(skipped) > 5 else ''}",
        SurgeonWarning,
        stacklevel=4,
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else repr(err)
