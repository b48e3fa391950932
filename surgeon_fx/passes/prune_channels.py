"""``prune_channels``: remove the rows and columns a :class:`PruneSelection` drops.

Both modes store every pruned tensor in its compact shape, by swapping the
container module that contains it for a copy with the sliced tensors (the original
container goes into the journal, so :func:`surgeon_fx.restore` gives it back).
Linear nodes keep reading their weights through ``get_attr``, so low-rank
decomposition can run on the pruned sites afterwards.

- Hard: every shape constant downstream is rewritten
  (:mod:`surgeon_fx.passes.prune_shapes`), and the graph runs at the new sizes.
- Soft: :class:`~surgeon_fx.masking.ChannelGather` and
  :class:`~surgeon_fx.masking.ChannelScatter` nodes keep the original sizes
  between compact operations, so the removed channels read as zeros. Norms over
  a pruned hidden size normalise the kept channels only, as the hard graph does.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import fx, nn

from .._fx_utils import fetch_attr, op_name
from ..analysis import LinearSite
from ..errors import PlanError
from ..masking import ChannelGather, ChannelScatter
from .manager import PassResult, Rewriter
from .prune_select import PruneSelection
from .prune_shapes import plan_shape_edits

logger = logging.getLogger(__name__)

CONTAINER = "surgeon_fx_prune"
_NORMS = {"layer_norm", "rms_norm"}


def prune_channels(selection: PruneSelection, *, hard: bool):
    """Return a pass that prunes ``selection`` from a graph module, hard or soft.

    Every new tensor and every graph edit is computed before the first change.
    """

    def run(gm: fx.GraphModule, rewriter: Rewriter) -> PassResult:
        if not selection:
            return PassResult(gm, modified=False)
        tensors = compact_tensors(gm, selection)
        if hard:
            edits = plan_shape_edits(gm, tensors, _pruned_outputs(selection), _kv_repeats(selection))
        full_shapes = {path: tuple(fetch_attr(gm, path).shape) for path, _ in selection.param_indices}
        _swap_containers(gm, rewriter, tensors)
        if hard:
            edits.apply(gm)
        else:
            _insert_soft_nodes(gm, rewriter, selection, full_shapes)
        _record(rewriter, selection, hard)
        return PassResult(gm, modified=True)

    return run


# --- tensors -------------------------------------------------------------------


def compact_tensors(gm: fx.GraphModule, selection: PruneSelection) -> dict[str, torch.Tensor]:
    """Return ``{tensor path: pruned copy}`` for every tensor the selection shrinks."""
    tensors: dict[str, torch.Tensor] = {}
    for site in selection.sites.values():
        weight_path, bias_path = _tensor_paths(site)
        weight, bias = site.tensors(gm)
        out = _index(selection.site_indices.get((site.path, "out")), weight.device)
        into = _index(selection.site_indices.get((site.path, "in")), weight.device)
        # Stored as (out, in), or (in, out) for GPT-2's Conv1D.
        out_dim, in_dim = (0, 1) if site.weight_layout == "out_in" else (1, 0)
        new = weight.detach()
        if out is not None:
            new = new.index_select(out_dim, out)
        if into is not None:
            new = new.index_select(in_dim, into)
        tensors[weight_path] = new.clone()
        if bias is not None and out is not None:
            tensors[bias_path] = bias.detach().index_select(0, out).clone()
    for (path, dim), kept in selection.param_indices.items():
        current = tensors.get(path)
        if current is None:
            current = fetch_attr(gm, path).detach()
        tensors[path] = current.index_select(dim, _index(kept, current.device)).clone()
    return tensors


def _index(kept: list[int] | None, device) -> torch.Tensor | None:
    return None if kept is None else torch.tensor(kept, dtype=torch.long, device=device)


def _tensor_paths(site: LinearSite) -> tuple[str, str | None]:
    if site.node.op == "call_module":
        return f"{site.node.target}.weight", f"{site.node.target}.bias"
    if site.weight_node is None or site.weight_node.op != "get_attr":
        # NOTE: Dynamo graphs pass weights as placeholders; pruning needs captured graphs.
        raise PlanError(
            f"cannot prune {site.path}: its weight is not a module attribute; capture the model "
            "with surgeon_fx.capture instead of pruning inside torch.compile"
        )
    bias = site.bias_node.target if site.bias_node is not None and site.bias_node.op == "get_attr" else None
    return site.weight_node.target, bias


def _swap_containers(gm: fx.GraphModule, rewriter: Rewriter, tensors: dict[str, torch.Tensor]) -> None:
    """Swap each module holding pruned tensors for a copy holding the compact ones."""
    by_container: dict[str, dict[str, torch.Tensor]] = {}
    for path, tensor in tensors.items():
        container, _, name = path.rpartition(".")
        if not container:
            raise PlanError(
                f"cannot prune {path!r}: a tensor held by the graph module itself cannot be swapped; "
                "capture a model whose parameters live in submodules"
            )
        by_container.setdefault(container, {})[name] = tensor
    for container, replacements in by_container.items():
        rewriter.swap_module(container, _copy_with(fetch_attr(gm, container), replacements))


def _copy_with(module: nn.Module, replacements: dict[str, torch.Tensor]) -> nn.Module:
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for name, tensor in replacements.items():
        if name in module._parameters:
            new._parameters[name] = nn.Parameter(tensor, requires_grad=module._parameters[name].requires_grad)
        elif name in module._buffers:
            new._buffers[name] = tensor
        else:
            raise ValueError(f"{name!r} is neither a parameter nor a buffer of {type(module).__name__}")
    if isinstance(new, nn.Linear):
        new.out_features, new.in_features = new.weight.shape
    return new


# --- hard mode -----------------------------------------------------------------


def _pruned_outputs(selection: PruneSelection) -> dict[fx.Node, list[int]]:
    return {
        site.node: selection.site_indices[(site.path, "out")]
        for site in selection.sites.values()
        if (site.path, "out") in selection.site_indices
    }


def _kv_repeats(selection: PruneSelection) -> dict[fx.Node, tuple[int, int]]:
    """Map each ``expand`` that repeats kv heads to (old, new) queries per kv head."""
    repeats = {}
    for action in selection.actions:
        group = action.group
        if group.unit != "heads" or group.queries_per_kv == 1:
            continue
        new = len(action.kept) // len(group.kept_kv_heads(action.kept))
        if new == group.queries_per_kv:
            continue
        op = group.attention
        for node in _walk_down([op.k.node, op.v.node]):
            if op_name(node) == "expand":
                repeats[node] = (group.queries_per_kv, new)
    return repeats


_KV_PATH = {
    "view", "reshape", "_unsafe_view", "transpose", "permute", "unsqueeze", "slice", "expand", "mul",
    "add", "neg", "cat", "getitem", "split", "split_with_sizes", "contiguous", "clone", "_to_copy", "to",
}


def _walk_down(starts: list[fx.Node]) -> list[fx.Node]:
    """Return the shape and rotary ops between key/value projections and the attention op."""
    found: list[fx.Node] = []
    queue = list(starts)
    while queue and len(found) < 128:
        node = queue.pop()
        for user in node.users:
            if op_name(user) in _KV_PATH and user not in found:
                found.append(user)
                queue.append(user)
    return found


# --- soft mode -----------------------------------------------------------------


class _SoftNodes:
    """Factory of gather and scatter nodes, sharing one module per index list under ``surgeon_fx_prune``."""

    def __init__(self, gm: fx.GraphModule, rewriter: Rewriter) -> None:
        self.gm = gm
        self.container = nn.Module()
        rewriter.swap_module(CONTAINER, self.container)
        self.names: dict[tuple, str] = {}

    def call(self, kind: str, kept: list[int], size: int, dim: int, value: fx.Node) -> fx.Node:
        key = (kind, tuple(kept), size, dim)
        name = self.names.get(key)
        if name is None:
            name = self.names[key] = f"{kind}_{len(self.names)}"
            module = ChannelGather(kept, dim) if kind == "gather" else ChannelScatter(kept, size, dim)
            self.container.add_module(name, module.to(_device_of(self.gm)))
        node = self.gm.graph.call_module(f"{CONTAINER}.{name}", (value,))
        if "nn_module_stack" in value.meta:
            node.meta["nn_module_stack"] = value.meta["nn_module_stack"]
        return node


def _device_of(gm: fx.GraphModule) -> torch.device:
    for tensor in gm.parameters():
        return tensor.device
    return torch.device("cpu")


def _insert_soft_nodes(gm: fx.GraphModule, rewriter: Rewriter, selection: PruneSelection, full_shapes: dict) -> None:
    soft = _SoftNodes(gm, rewriter)
    graph = gm.graph
    for site in selection.sites.values():
        into = selection.site_indices.get((site.path, "in"))
        out = selection.site_indices.get((site.path, "out"))
        if into is not None:
            with graph.inserting_before(site.node):
                gathered = soft.call("gather", into, site.in_features, -1, site.input)
            site.node.replace_input_with(site.input, gathered)
        if out is not None:
            with graph.inserting_after(site.node):
                scattered = soft.call("scatter", out, site.out_features, -1, site.node)
            site.node.replace_all_uses_with(scattered, delete_user_cb=lambda user: user is not scattered)
    hidden = next((a for a in selection.actions if a.group.unit == "hidden"), None)
    norms = set(hidden.group.norm_nodes) if hidden is not None else set()
    _scatter_params(gm, soft, selection, norms, full_shapes)
    if hidden is not None:
        for node in hidden.group.norm_nodes:
            _prune_norm(gm, soft, node, hidden.kept, hidden.group.size)


def _scatter_params(gm: fx.GraphModule, soft: _SoftNodes, selection: PruneSelection, norms: set, full_shapes) -> None:
    """Read each pruned parameter through a scatter back to its full shape, except in norms."""
    for (path, dim), kept in selection.param_indices.items():
        for node in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == path]:
            users = [u for u in node.users if u not in norms]
            if not users:
                continue
            with gm.graph.inserting_after(node):
                scattered = soft.call("scatter", kept, full_shapes[path][dim], dim, node)
            for user in users:
                user.replace_input_with(node, scattered)


def _prune_norm(gm: fx.GraphModule, soft: _SoftNodes, node: fx.Node, kept: list[int], hidden: int) -> None:
    """Normalise over the kept hidden channels only: gather, norm or mean, scatter back."""
    x = node.args[0]
    with gm.graph.inserting_before(node):
        gathered = soft.call("gather", kept, hidden, -1, x)
    if op_name(node) in _NORMS:
        node.args = (gathered, [len(kept)]) + tuple(node.args[2:])
        with gm.graph.inserting_after(node):
            scattered = soft.call("scatter", kept, hidden, -1, node)
        node.replace_all_uses_with(scattered, delete_user_cb=lambda user: user is not scattered)
    else:
        # RMSNorm's mean(x ** 2, -1): the mean over the kept channels, as hard pruning computes it.
        node.args = (gathered,) + tuple(node.args[1:])


def _record(rewriter: Rewriter, selection: PruneSelection, hard: bool) -> None:
    for site in selection.sites.values():
        out, into = selection.site_shape(site)
        after = out * into + (out if site.has_bias else 0)
        rewriter.record(
            path=site.path, role=site.role, layer=site.layer, method="prune", hard=hard,
            out_features=out, in_features=into, params_before=site.num_params, params_after=after,
        )
    for action in selection.actions:
        logger.info("pruned %s: kept %d of %d units", action.group.name, len(action.kept), action.group.size)
