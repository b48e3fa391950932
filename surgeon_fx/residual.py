"""The residual stream of each tower of a blockwise capture, for hidden-size pruning.

In a whole graph, the hidden-size group comes from one walk along the hidden
dimension (see :mod:`surgeon_fx.analysis.coupling`). A blockwise capture has one
graph per part, and the code between the parts (the embedding lookup, the window
reordering of image patches, the merge of image features into the text) is in none
of them. The stream is joined from one eager run on the example inputs instead:

1. Walk the hidden dimension inside every block of the tower's stack, from its
   first projection. The walk must enter the block through one input, the hidden
   state, and leave through the block's output.
2. Run the model once with forward hooks on the blocks and on every module outside
   them, recording each one's inputs and output. A *row* is the hidden-state vector
   of one token. The blocks must pass their rows on: the rows entering block
   ``i + 1`` are rows that block ``i`` returned.
3. The *writers* are the outermost modules whose output rows appear among the rows
   entering the first block: the token embedding, the patch embedding, the patch
   merger whose features replace the image tokens. Together they must account for
   every row, or some of the stream is computed by the model's own forward code
   (a class token, a position table added there), which cannot be pruned here.
4. The *readers* are the outermost modules whose input rows all come from the last
   block's output: a final norm, an output head, a patch merger. When a reader
   passes the stream on (a final norm does), the modules that read its output are
   readers too.
5. Walk each writer back from its output and each reader on from its input, in its
   part of the capture or, for a module without linear layers, in a graph exported
   from it alone.

Rows are compared bit for bit. Indexing, scattering, slicing and reshaping copy
rows unchanged and any arithmetic changes them, so a match means the values moved
without being computed on. Rows whose entries are all equal (padding) are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ._fx_utils import fetch_attr, node_shape
from .analysis import Analysis, LinearSite
from .analysis.coupling import CouplingGroup, HiddenWalk, Slot, walk_hidden
from .analysis.towers import tower_names
from .blockwise import BLOCKWISE_META, PART_META, BlockwiseCapture, _export_part
from .capture import check_forward_runs
from .live_hidden import norm_module_path

_SEEDS = ("q", "qkv", "mlp_up", "mlp_gate", "mlp_gate_up")


@dataclass
class _Call:
    """The first call of a module in the recording run."""

    args: tuple
    kwargs: dict
    output: Any

    def first_input(self) -> torch.Tensor | None:
        return _first_tensor((self.args, self.kwargs))

    def first_output(self) -> torch.Tensor | None:
        return _first_tensor(self.output)


@dataclass
class _Stream:
    """The slots, sites and norms of one tower's residual stream, assembled part by part."""

    hidden: int
    slots: list[Slot] = field(default_factory=list)
    sites: list[LinearSite] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, walk: HiddenWalk, where: str) -> None:
        self.slots += [s for s in walk.slots if s not in self.slots]
        self.sites += [s for s in walk.sites if s not in self.sites]
        self.problems += walk.problems
        for node in walk.norm_nodes:
            path = norm_module_path(node)
            if path is None:
                self.problems.append(
                    f"the normalisation {node.name} in {where} belongs to no module surgeon_fx can replace"
                )
            elif path not in self.norms:
                self.norms.append(path)


def blockwise_hidden_groups(model: nn.Module, analysis: Analysis, args: tuple, kwargs: dict) -> list[CouplingGroup]:
    """Return one hidden-size group per tower of the blockwise capture ``analysis.gm``.

    A group that cannot be pruned gives the reason in ``unsupported``. Norm layers are
    listed as module paths in ``norm_modules``.
    """
    capture: BlockwiseCapture = analysis.gm.meta[BLOCKWISE_META]
    names = tower_names(capture.stacks)
    hidden = {}
    for stack in capture.stacks:
        seeds = [s for s in analysis.sites if s.tower == names[stack] and s.role in _SEEDS]
        if seeds:
            hidden[stack] = seeds[0].in_features
    calls = _record(model, capture.stacks, args, kwargs, set(hidden.values()))
    groups = []
    for stack, size in hidden.items():
        tower = names[stack]
        stream = _Stream(size)
        _tower_stream(model, analysis, capture, stack, calls, stream)
        group = CouplingGroup("hidden", stream.hidden, stream.slots, stream.sites, norm_modules=stream.norms)
        group.tower, group.block = tower, stack
        if stream.problems:
            group.unsupported = "; ".join(dict.fromkeys(stream.problems))
        groups.append(group)
    return groups


def _tower_stream(model, analysis: Analysis, capture: BlockwiseCapture, stack: str, calls, stream: _Stream) -> None:
    by_node = {site.node: site for site in analysis.sites}
    blocks = [f"{stack}.{name}" for name, _ in model.get_submodule(stack).named_children()]
    parts = {part.path for part in capture.parts}
    missing = [b for b in blocks if b not in parts or b not in calls]
    if missing:
        stream.problems.append(f"the blocks {missing[:3]} were not captured, so their hidden size cannot change")
        return

    for block in blocks:
        seeds = [s for s in analysis.sites if s.path.startswith(f"{block}.") and s.role in _SEEDS]
        if not seeds:
            stream.problems.append(f"{block} has no projection that reads the hidden state")
            continue
        walk = walk_hidden(seeds[0].input, stream.hidden, by_node, boundary=True)
        stream.add(walk, block)
        if len(walk.entries) != 1 or not walk.exits:
            stream.problems.append(
                f"the hidden state enters {block} through {len(walk.entries)} inputs and leaves through "
                f"{len(walk.exits)} outputs; only one of each can be followed"
            )

    rows_in = [_rows(_hidden_tensor(calls[b], stream.hidden, "input"), stream.hidden) for b in blocks]
    rows_out = [_rows(_hidden_tensor(calls[b], stream.hidden, "output"), stream.hidden) for b in blocks]
    for index in range(1, len(blocks)):
        if not rows_in[index] or not rows_in[index] <= rows_out[index - 1]:
            stream.problems.append(
                f"the hidden state changes between {blocks[index - 1]} and {blocks[index]} outside any block"
            )
    outside = {path: call for path, call in calls.items() if _outside(path, capture.stacks)}
    _add_writers(model, analysis, capture, outside, rows_in[0], blocks[0], stream, by_node)
    _add_readers(model, analysis, capture, outside, rows_out[-1], stream, by_node)
    _check_untied(model, stream)


def _check_untied(model: nn.Module, stream: _Stream) -> None:
    """Report a tensor that two slots share, such as an output head tied to the embedding."""
    owners: dict[int, str] = {}
    for slot in stream.slots:
        tensor = fetch_attr(model, slot.target if slot.kind == "param" else f"{slot.target}.weight")
        owner = owners.setdefault(id(tensor), slot.target)
        if owner != slot.target:
            stream.problems.append(
                f"{slot.target} and {owner} share one weight tensor (tied weights; untie them first with "
                f"module.weight = torch.nn.Parameter(module.weight.clone()) on {slot.target})"
            )


def _add_writers(model, analysis, capture, outside: dict, rows: set, first_block: str, stream: _Stream, by_node) -> None:
    matches = {
        path: found & rows
        for path, call in outside.items()
        if (found := _rows(call.first_output(), stream.hidden)) and found & rows
    }
    covered: set = set()
    for path in _outermost(matches):
        covered |= matches[path]
        walk = _walk_part(model, analysis, capture, path, outside[path], stream.hidden, "output", by_node)
        stream.add(walk, path)
        if walk.entries:
            stream.problems.append(f"{path} writes the hidden state from an input that carries it too")
    if not rows or covered != rows:
        stream.problems.append(
            f"{len(rows - covered)} of the {len(rows)} hidden-state rows entering {first_block} come from no "
            "module but from the model's own forward code (a class token or position table added there)"
        )


def _add_readers(model, analysis, capture, outside: dict, rows: set, stream: _Stream, by_node) -> None:
    frontier, done = set(rows), set()
    while True:
        matches = {
            path: found
            for path, call in outside.items()
            if path not in done and (found := _rows(call.first_input(), stream.hidden)) and found <= frontier
        }
        readers = [p for p in _outermost(matches) if not any(p.startswith(f"{d}.") for d in done)]
        if not readers:
            return
        for path in readers:
            done.add(path)
            walk = _walk_part(model, analysis, capture, path, outside[path], stream.hidden, "input", by_node)
            stream.add(walk, path)
            if len(walk.entries) > 1:
                stream.problems.append(f"{path} reads the hidden state through {len(walk.entries)} inputs")
            if walk.exits:  # passes the stream on, as a final norm does
                frontier |= _rows(outside[path].first_output(), stream.hidden)


def _walk_part(model, analysis, capture, path: str, call: _Call, hidden: int, side: str, by_node) -> HiddenWalk:
    """Walk the hidden dimension in the graph of ``path``, from its ``side`` (input or output)."""
    index = next((i for i, part in enumerate(capture.parts) if part.path == path), None)
    if index is not None:  # a captured part: its nodes in the joined graph
        nodes = analysis.gm.graph.nodes
        placeholders = [n for n in nodes if n.op == "placeholder" and n.meta.get(PART_META) == path]
        output = next(n for n in nodes if n.op == "output").args[0][index]
    else:
        module = model.get_submodule(path)
        if any(isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" for m in module.modules()):
            return HiddenWalk(hidden, {}, problems=[f"{path} has linear layers but was not captured"])
        try:
            gm = _export_part(module, path, call.args, call.kwargs)
        except Exception as err:  # noqa: BLE001 - reported as the reason the group cannot be pruned
            return HiddenWalk(hidden, {}, problems=[f"{path} does not export ({type(err).__name__})"])
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        by_node = {}
    if side == "input":
        starts = [n for n in placeholders if _last_dim(n) == hidden]
    else:
        starts = [n for n in _nodes_in(output) if _last_dim(n) == hidden][:1]
    if len(starts) != 1:
        return HiddenWalk(hidden, {}, problems=[f"cannot tell which {side} of {path} is the hidden state"])
    return walk_hidden(starts[0], hidden, by_node, boundary=True)


def _nodes_in(value: Any) -> list[fx.Node]:
    nodes: list[fx.Node] = []
    fx.node.map_arg(value, nodes.append)
    return nodes


def _last_dim(node: fx.Node) -> int | None:
    shape = node_shape(node)
    return int(shape[-1]) if shape and isinstance(shape[-1], int) else None


def _outermost(paths) -> list[str]:
    """Return the paths of ``paths`` that no other one of them contains, in order."""
    paths = list(paths)
    return [p for p in paths if not any(p.startswith(f"{q}.") for q in paths if q != p)]


def _outside(path: str, stacks: list[str]) -> bool:
    """Return True if ``path`` is neither inside a stack nor around one (nor the model itself)."""
    for stack in stacks:
        if path == stack or path.startswith(f"{stack}.") or not path or stack.startswith(f"{path}."):
            return False
    return True


def _record(model: nn.Module, stacks: list[str], args: tuple, kwargs: dict, sizes: set[int]) -> dict[str, _Call]:
    """Run ``model`` once and return the first call of every block and outside module.

    Only calls whose first input or output has a last dimension in ``sizes`` (the
    towers' hidden sizes) are kept, which leaves out large outputs such as logits.
    """
    calls: dict[str, _Call] = {}

    def hook(path: str):
        def record(module, hook_args, hook_kwargs, output) -> None:
            if path in calls:
                return
            call = _Call(hook_args, hook_kwargs, output)
            if any(t is not None and t.dim() and t.shape[-1] in sizes for t in (call.first_input(), call.first_output())):
                calls[path] = call

        return record

    paths = [
        path for path, _ in model.named_modules()
        if _outside(path, stacks) or any(path.rpartition(".")[0] == stack for stack in stacks)
    ]
    handles = [model.get_submodule(p).register_forward_hook(hook(p), with_kwargs=True) for p in paths]
    try:
        check_forward_runs(model, args, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _hidden_tensor(call: _Call, hidden: int, side: str) -> torch.Tensor | None:
    values = (call.args, call.kwargs) if side == "input" else call.output
    return _first_tensor(values, hidden)


def _first_tensor(value: Any, last_dim: int | None = None) -> torch.Tensor | None:
    """Return the first tensor in a nest of tuples, lists and dicts (with that last dim)."""
    if isinstance(value, torch.Tensor):
        return value if last_dim is None or (value.dim() and value.shape[-1] == last_dim) else None
    if isinstance(value, dict):
        value = list(value.values())
    elif hasattr(value, "to_tuple"):  # a transformers ModelOutput
        value = value.to_tuple()
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item, last_dim)
            if found is not None:
                return found
    return None


def _rows(tensor: torch.Tensor | None, hidden: int) -> set[bytes]:
    """Return the bytes of every row (last-dim vector) of ``tensor`` whose entries are not all equal."""
    if tensor is None or not tensor.is_floating_point() or not tensor.dim() or tensor.shape[-1] != hidden:
        return set()
    flat = tensor.detach().reshape(-1, hidden)
    flat = flat[flat.amax(1) != flat.amin(1)].contiguous().cpu()
    raw = flat.view(torch.uint8).reshape(len(flat), -1).numpy()
    return {row.tobytes() for row in raw}
