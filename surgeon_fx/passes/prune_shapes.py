"""Shape constants after hard pruning: find and rewrite every size a pruned graph bakes in.

An exported graph spells head counts and channel counts as integers:
``expand(k, [B, 2, 2, T, 16])`` and ``reshape(k, [B, 4, T, 16])`` for Llama's
repeated key/value heads, ``view(addmm, [B, T, 192])`` and ``split(qkv, 64, 2)`` for
GPT-2's fused projection, ``layer_norm(x, [64], ...)`` for every norm. After rows
and columns are removed, each of these must name the new size.

:func:`plan_shape_edits` runs the graph on fake tensors (the fake mode that export
left in ``node.meta["val"]``, so batch and sequence stay symbolic) with the pruned
tensors in place. Before each shape operation runs, its constants are recomputed
from the old and new shapes of its input:

1. ``view``/``reshape``: input and output dims are grouped by equal products of
   their old sizes. When a group's input grew or shrank by a factor ``f``, the
   group's ``-1`` absorbs it, or else its first dim is multiplied by ``f``, the
   head count in ``[heads, head_dim]`` order.
2. ``expand``: a dim that copies its input takes the input's new size. A dim that
   broadcasts a size-1 input keeps its count. The exception is the dim that repeats
   each kv head for its query heads, when the rule removes query heads per group.
3. ``slice``/``split``/``chunk`` on a pruned dim: the bounds count the kept
   channels below each old bound, read from the kept indices of the projection
   whose output is being cut.
4. ``layer_norm``/``rms_norm``: the normalised shape becomes the input's new trailing size.

The edits are returned, not applied, so a failure leaves the graph untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.fx.node import map_arg

from .._fx_utils import fetch_attr, node_shape, op_name
from ..analysis.coupling import as_expr

_VIEWS = {"view", "reshape", "_unsafe_view"}
_CUTS = {"slice", "narrow", "split", "split_with_sizes", "chunk"}
# Operations after which the last dim still lists the same channels.
_CHANNEL_PRESERVING = {"_to_copy", "to", "clone", "contiguous", "alias", "detach", "dropout", "add", "mul"}
_SKIPPED_MODULES = {"_guards_fn"}


@dataclass
class ShapeEdits:
    """New ``args`` (and, for ``split``, a new target) per node, and fresh metadata values."""

    args: dict[fx.Node, tuple] = field(default_factory=dict)
    targets: dict[fx.Node, Any] = field(default_factory=dict)
    values: dict[fx.Node, Any] = field(default_factory=dict)

    def apply(self, gm: fx.GraphModule) -> None:
        for node, args in self.args.items():
            node.args = args
        for node, target in self.targets.items():
            node.target = target
        for node, value in self.values.items():
            node.meta["val"] = value


def plan_shape_edits(
    gm: fx.GraphModule,
    tensors: dict[str, torch.Tensor],
    last_dim_kept: dict[fx.Node, list[int]],
    kv_repeats: dict[fx.Node, tuple[int, int]],
    rewrite: bool = True,
) -> ShapeEdits:
    """Return the edits that make ``gm`` run with ``tensors`` (path -> new tensor) in place.

    ``last_dim_kept`` gives, for a node whose last dim lost channels (a pruned
    projection's output), the old indices that stay. ``kv_repeats`` maps an
    ``expand`` of grouped-query attention to its old and new queries per kv head.
    With ``rewrite=False`` only the metadata values are recomputed.

    Raises:
        ValueError: a shape operation cannot be rewritten, or the graph does not run
            at the new sizes.
    """
    placeholders = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode(placeholders)
    if mode is None:
        raise ValueError("the graph has no fake tensor metadata; capture it with surgeon_fx.capture")
    walk = _Propagation(gm, mode, tensors, dict(last_dim_kept), kv_repeats, rewrite)
    for node in gm.graph.nodes:
        try:
            walk.visit(node)
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            raise ValueError(f"node {node.name} ({op_name(node)}) does not run at the pruned sizes: {err}") from err
    return walk.edits


class _Propagation:
    def __init__(self, gm, mode, tensors, kept, kv_repeats, rewrite) -> None:
        self.gm, self.mode, self.tensors = gm, mode, tensors
        self.kept, self.kv_repeats, self.rewrite = kept, kv_repeats, rewrite
        self.env: dict[fx.Node, Any] = {}
        self.edits = ShapeEdits()

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.env[node] = node.meta.get("val")
            return
        if node.op == "output":
            return
        if node.op == "get_attr":
            value = self.tensors.get(node.target)
            if value is None:
                value = fetch_attr(self.gm, node.target)
            self.env[node] = self.mode.from_tensor(value, static_shapes=True) if isinstance(value, torch.Tensor) else value
            self._store(node)
            return
        args = node.args
        if self.rewrite and node.op == "call_function":
            args = self._rewrite(node)
        values = map_arg(args, lambda n: self.env[n])
        kwargs = map_arg(node.kwargs, lambda n: self.env[n])
        if node.op == "call_module":
            if node.target in _SKIPPED_MODULES:
                self.env[node] = None
                return
            self.env[node] = self._run_module(node, values, kwargs)
        elif node.op == "call_method":
            with self.mode:
                self.env[node] = getattr(values[0], node.target)(*values[1:], **kwargs)
        else:
            with self.mode:
                self.env[node] = self.edits.targets.get(node, node.target)(*values, **kwargs)
        self._track_kept(node)
        self._store(node)

    def _run_module(self, node, values, kwargs):
        module = fetch_attr(self.gm, node.target)
        previous = self.mode.allow_non_fake_inputs
        self.mode.allow_non_fake_inputs = True
        try:
            with self.mode:
                return module(*values, **kwargs)
        finally:
            self.mode.allow_non_fake_inputs = previous

    def _store(self, node: fx.Node) -> None:
        value = self.env.get(node)
        if "val" in node.meta and isinstance(value, (torch.Tensor, list, tuple, torch.SymInt, int)):
            self.edits.values[node] = value

    # --- rules -------------------------------------------------------------------

    def _rewrite(self, node: fx.Node) -> tuple:
        name = op_name(node)
        args = node.args
        if not args or not isinstance(args[0], fx.Node):
            return args
        x = args[0]
        old_in, new_in = node_shape(x), _shape(self.env.get(x))
        if old_in is None or new_in is None or _same_shape(old_in, new_in):
            if name == "expand" and node in self.kv_repeats:
                return self._record(node, _expand_args(node, old_in, new_in, self.kv_repeats[node]))
            return args
        if name in _VIEWS:
            sizes = _resize_view(old_in, new_in, node_shape(node), list(args[1]))
            return self._record(node, (x, sizes) + tuple(args[2:]))
        if name == "expand":
            return self._record(node, _expand_args(node, old_in, new_in, self.kv_repeats.get(node)))
        if name in ("layer_norm", "rms_norm"):
            count = len(args[1])
            return self._record(node, (x, [int(d) for d in new_in[len(new_in) - count:]]) + tuple(args[2:]))
        if name in _CUTS:
            return self._record(node, self._cut_args(node, name, old_in, new_in))
        return args

    def _record(self, node: fx.Node, args: tuple) -> tuple:
        if args != node.args:
            self.edits.args[node] = args
        return args

    def _cut_args(self, node: fx.Node, name: str, old_in, new_in) -> tuple:
        x, args = node.args[0], node.args
        dim = _cut_dim(node, name) % len(old_in)
        if _same(old_in[dim], new_in[dim]):
            return args
        kept = self.kept.get(x)
        if kept is None or dim != len(old_in) - 1:
            raise ValueError(f"{name} cuts a pruned dim whose kept channels are unknown")
        old_size = int(old_in[dim])
        if name in ("slice", "narrow"):
            start, end = _bounds(node, name, old_size)
            new_start, new_end = _count_below(kept, start), _count_below(kept, end)
            if name == "narrow":
                return (x, args[1], new_start, new_end - new_start)
            return (x, args[1], new_start, new_end) + tuple(args[4:])
        sections = _sections(node, name, old_size)
        sizes = [_count_below(kept, b) - _count_below(kept, a) for a, b in sections]
        if name == "chunk":
            if len(set(sizes)) != 1:
                raise ValueError(f"chunk into {args[1]} no longer gives equal pieces {sizes}")
            return args
        if name == "split" and len(set(sizes)) == 1:
            return (x, sizes[0]) + tuple(args[2:])
        self.edits.targets[node] = torch.ops.aten.split_with_sizes.default
        return (x, sizes) + tuple(args[2:])

    def _track_kept(self, node: fx.Node) -> None:
        """Follow the kept channels of a pruned last dim through views, slices and splits."""
        name = op_name(node)
        x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if x is None or x not in self.kept or node in self.kept:
            return
        kept = self.kept[x]
        if name == "getitem":
            if kept and isinstance(kept[0], list):
                self.kept[node] = kept[node.args[1]]
            return
        if kept and isinstance(kept[0], list):
            return
        old_in, old_out = node_shape(x), node_shape(node)
        last = len(old_in) - 1
        if name in _VIEWS | _CHANNEL_PRESERVING:
            if old_out is not None and len(old_out) and _same(old_in[-1], old_out[-1]):
                self.kept[node] = kept
        elif name in ("slice", "narrow") and _cut_dim(node, name) % len(old_in) == last:
            start, end = _bounds(node, name, int(old_in[-1]))
            self.kept[node] = [k - start for k in kept if start <= k < end]
        elif name in ("split", "split_with_sizes", "chunk") and _cut_dim(node, name) % len(old_in) == last:
            sections = _sections(node, name, int(old_in[-1]))
            self.kept[node] = [[k - a for k in kept if a <= k < b] for a, b in sections]


def _shape(value: Any):
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _same(a, b) -> bool:
    return sympy.simplify(as_expr(a) - as_expr(b)) == 0


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _cut_dim(node: fx.Node, name: str) -> int:
    if name == "slice":
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if name == "narrow":
        return node.args[1]
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)


def _bounds(node: fx.Node, name: str, size: int) -> tuple[int, int]:
    if name == "narrow":
        return node.args[2], node.args[2] + node.args[3]
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else size
    if len(node.args) > 4 and node.args[4] != 1:
        raise ValueError("a strided slice of a pruned dim cannot be rewritten")
    start, end = (s + size if s < 0 else s for s in (start, end))
    return min(start, size), min(end, size)


def _sections(node: fx.Node, name: str, size: int) -> list[tuple[int, int]]:
    if name == "split_with_sizes":
        sizes = list(node.args[1])
    else:
        step = node.args[1] if name == "split" else -(-size // node.args[1])
        sizes = [min(step, size - i) for i in range(0, size, step)]
    bounds, start = [], 0
    for s in sizes:
        bounds.append((start, start + s))
        start += s
    return bounds


def _count_below(kept: list[int], bound: int) -> int:
    return sum(1 for k in kept if k < bound)


def _expand_args(node: fx.Node, old_in, new_in, repeats: tuple[int, int] | None) -> tuple:
    """Rewrite ``expand`` sizes: copied dims follow the input, the kv repeat dim follows the plan."""
    sizes = list(node.args[1])
    offset = len(sizes) - len(old_in)
    for o, size in enumerate(sizes):
        i = o - offset
        if not isinstance(size, int) or size == -1 or i < 0:
            continue
        if _same(old_in[i], size) and not _same(old_in[i], 1):
            sizes[o] = int(new_in[i])
        elif _same(old_in[i], 1) and repeats is not None and size == repeats[0]:
            sizes[o] = repeats[1]  # queries per kv head after removing query heads per group
    return (node.args[0], sizes) + tuple(node.args[2:])


def _resize_view(old_in, new_in, old_out, sizes: list) -> list:
    """Rescale the constants of a view's size list to a new input shape (rule 1 above)."""
    if old_out is None or len(old_out) != len(sizes):
        raise ValueError("the view's output shape is unknown")
    new_sizes = list(sizes)
    for in_dims, out_dims in _groups(old_in, old_out):
        old = _product(as_expr(old_in[i]) for i in in_dims)
        new = _product(as_expr(new_in[i]) for i in in_dims)
        factor = sympy.simplify(new / old)
        if factor == 1 or any(sizes[o] == -1 for o in out_dims):
            continue
        for o in out_dims:
            if isinstance(sizes[o], int):
                scaled = sympy.simplify(sizes[o] * factor)
                if not scaled.is_Integer:
                    raise ValueError(f"view size {sizes[o]} cannot be scaled by {factor}")
                new_sizes[o] = int(scaled)
                break
        else:
            raise ValueError(f"no constant in view sizes {sizes} can absorb the factor {factor}")
    return new_sizes


def _groups(in_shape, out_shape) -> list[tuple[list[int], list[int]]]:
    """Split dims into consecutive (input dims, output dims) groups with equal products."""
    groups = []
    i = o = 0
    while i < len(in_shape) and o < len(out_shape):
        in_dims, out_dims = [i], [o]
        left, right = as_expr(in_shape[i]), as_expr(out_shape[o])
        i, o = i + 1, o + 1
        while sympy.simplify(left - right) != 0:
            if _divides(left, right) and i < len(in_shape):
                left, i = left * as_expr(in_shape[i]), i + 1
                in_dims.append(i - 1)
            elif o < len(out_shape):
                right, o = right * as_expr(out_shape[o]), o + 1
                out_dims.append(o - 1)
            else:
                raise ValueError(f"cannot match view dims {in_shape} to {out_shape}")
        groups.append((in_dims, out_dims))
    return groups


def _divides(a, b) -> bool:
    _, denominator = sympy.fraction(sympy.cancel(b / a))
    return denominator == 1 and sympy.simplify(a - b) != 0


def _product(values) -> sympy.Expr:
    result = sympy.Integer(1)
    for v in values:
        result = result * v
    return result
