"""Match attention operations and the linear sites that feed and consume them.

Two patterns are recognised:

1. ``scaled_dot_product_attention(q, k, v, ...)`` in any dialect.
2. The eager pattern ``matmul(softmax(matmul(q, k^T) * scale + mask), v)``, with
   optional dropout and dtype casts around the softmax.

For each match, the walk from the query, key and value inputs goes up through
shape-only and rotary operations (view, transpose, expand, mul, add, neg, cat, ...)
and stops at the first linear site on every path. The walk from the output goes
down through shape-only operations to the output projection. Walks are local: each
visits at most a few dozen nodes, so analysis time grows linearly with depth.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from torch import fx

from .._fx_utils import node_shape
from ._module_ops import op_kind
from .linear_sites import LinearSite

# Operations that only move, cast or rotate values between a projection and the
# attention op. "mul", "add", "neg", "cat" and "slice" cover rotary embeddings.
_PASS_THROUGH = {
    "view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "clone",
    "expand", "unsqueeze", "squeeze", "flatten", "unflatten", "_to_copy", "to", "type_as",
    "float", "half", "bfloat16", "type", "alias", "detach", "getitem", "split",
    "split_with_sizes", "chunk", "unbind", "slice", "select", "narrow", "mul", "div", "add",
    "sub", "neg", "cat", "repeat_interleave", "repeat", "dropout", "native_dropout",
    "lift_fresh_copy", "t", "mT", "size", "scale", "truediv", "copy", "stack",
}
_ROTARY_MARKERS = {"neg", "cat"}
_SOFTMAX = {"softmax", "_softmax", "_safe_softmax", "log_softmax"}
_MATMUL = {"matmul", "bmm", "baddbmm", "einsum"}
_MAX_WALK = 64
# Export inserts these runtime checks as extra users of a node.
_CHECKS = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"}


@dataclass(eq=False)
class AttentionOp:
    """One attention operation and its projections.

    ``q``/``k``/``v`` point to the same site for a fused ``qkv`` projection.
    """

    node: fx.Node
    kind: str  # "sdpa" or "eager"
    q: LinearSite | None = None
    k: LinearSite | None = None
    v: LinearSite | None = None
    out: LinearSite | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rotary: bool = False
    layer: int | None = None
    block: str | None = None
    tower: str | None = None
    nodes: list[fx.Node] = field(default_factory=list, repr=False)

    @property
    def fused_qkv(self) -> bool:
        return self.q is not None and self.q is self.k and self.k is self.v

    @property
    def sites(self) -> list[LinearSite]:
        seen: list[LinearSite] = []
        for site in (self.q, self.k, self.v, self.out):
            if site is not None and site not in seen:
                seen.append(site)
        return seen

    def __repr__(self) -> str:
        return (
            f"AttentionOp(layer={self.layer}, kind={self.kind!r}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, rotary={self.rotary})"
        )


def find_attention(sites_by_node: dict[fx.Node, LinearSite], graph: fx.Graph) -> list[AttentionOp]:
    """Return every attention operation of ``graph`` with its q/k/v/out sites."""
    matches = []
    for node in graph.nodes:
        name = op_kind(node)
        if name == "scaled_dot_product_attention" and len(node.args) >= 3:
            q, k, v = node.args[:3]
            matches.append(_build(node, "sdpa", q, k, v, node, sites_by_node))
        elif name in _SOFTMAX:
            eager = _match_eager(node)
            if eager is not None:
                q, k, v, output = eager
                matches.append(_build(node, "eager", q, k, v, output, sites_by_node))
    return [m for m in matches if m is not None]


def _match_eager(softmax: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node] | None:
    """Match ``matmul(softmax(matmul(q, kT) ...), v)`` around a softmax node."""
    scores = _walk_to(softmax.args[0], _MATMUL, upward=True)
    probs_user = _walk_to(softmax, _MATMUL, upward=False)
    if scores is None or probs_user is None or len(scores.args) < 2 or len(probs_user.args) < 2:
        return None
    q, k_t = scores.args[:2]
    v = probs_user.args[1]
    return q, k_t, v, probs_user


def _walk_to(start: object, targets: set[str], upward: bool) -> fx.Node | None:
    """Follow a chain of elementwise or cast ops to the nearest node in ``targets``."""
    node = start
    for _ in range(8):
        if not isinstance(node, fx.Node):
            return None
        if op_kind(node) in targets:
            return node
        if upward:
            node = node.args[0] if node.args else None
        else:
            users = [u for u in node.users if op_kind(u) not in _CHECKS]
            node = users[0] if len(users) == 1 else None
    return None


def _build(node, kind, q, k, v, output, sites_by_node) -> AttentionOp | None:
    q_site, q_path = _source_site(q, sites_by_node)
    k_site, k_path = _source_site(k, sites_by_node)
    v_site, _ = _source_site(v, sites_by_node)
    if q_site is None or k_site is None or v_site is None:
        return None
    op = AttentionOp(node=node, kind=kind, q=q_site, k=k_site, v=v_site)
    op.out = _consumer_site(output, sites_by_node)
    op.rotary = _has_rotary(q_path) and _has_rotary(k_path)
    op.block, op.layer = q_site.block, q_site.layer
    _set_geometry(op, q)
    return op


def _source_site(start: object, sites_by_node) -> tuple[LinearSite | None, list[fx.Node]]:
    """Walk up from an attention input to the linear site that produced it."""
    found: list[LinearSite] = []
    visited: list[fx.Node] = []
    queue = deque([start])
    while queue and len(visited) < _MAX_WALK:
        node = queue.popleft()
        if not isinstance(node, fx.Node) or node in visited:
            continue
        visited.append(node)
        site = sites_by_node.get(node)
        if site is not None:
            if site not in found:
                found.append(site)
            continue
        if op_kind(node) not in _PASS_THROUGH:
            continue
        queue.extend(a for a in node.args if isinstance(a, fx.Node))
        for value in node.args:
            if isinstance(value, (list, tuple)):
                queue.extend(a for a in value if isinstance(a, fx.Node))
    # Rotary embeddings mix in cos/sin tables that come from no linear site, so one
    # site is expected. Several sites mean the input is not a plain projection.
    if len(found) != 1:
        return None, visited
    return found[0], visited


def _consumer_site(output: fx.Node, sites_by_node) -> LinearSite | None:
    """Walk down from the attention output through shape-only ops to a linear site."""
    queue = deque([output])
    visited = 0
    while queue and visited < _MAX_WALK:
        node = queue.popleft()
        visited += 1
        for user in node.users:
            site = sites_by_node.get(user)
            if site is not None and site.input is node:
                return site
            if op_kind(user) in _PASS_THROUGH - {"mul", "add", "sub", "cat"} or _joins_rows(user):
                queue.append(user)
    return None


def _joins_rows(node: fx.Node) -> bool:
    """Whether ``node`` concatenates along a dimension before the last two (heads, head_dim).

    Attention computed chunk by chunk (Qwen2-VL's vision tower, one chunk per image
    or window) joins the chunks' outputs along the sequence, which keeps channels.
    """
    shape = node_shape(node)
    if op_kind(node) != "cat" or shape is None or len(shape) < 3:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim % len(shape) < len(shape) - 2


def _has_rotary(path: list[fx.Node]) -> bool:
    names = {op_kind(n) for n in path}
    return bool(names & _ROTARY_MARKERS) and "mul" in names


def _set_geometry(op: AttentionOp, q_input: fx.Node) -> None:
    shape = node_shape(q_input)
    if shape is not None and len(shape) == 4 and isinstance(shape[1], int):
        op.num_heads, op.head_dim = int(shape[1]), int(shape[3])
    else:
        op.head_dim = _head_dim_from_views(q_input)
        if op.head_dim and op.q is not None and not op.fused_qkv:
            op.num_heads = op.q.out_features // op.head_dim
    if not op.head_dim or not op.num_heads:
        return
    if op.fused_qkv:
        # qkv out_features = (num_heads + 2 * num_kv_heads) * head_dim
        op.num_kv_heads = (op.q.out_features // op.head_dim - op.num_heads) // 2
    else:
        op.num_kv_heads = op.k.out_features // op.head_dim


def _head_dim_from_views(q_input: fx.Node) -> int | None:
    """Read head_dim from the last entry of a 4-d view on the query path."""
    node = q_input
    for _ in range(_MAX_WALK):
        if not isinstance(node, fx.Node):
            return None
        if op_kind(node) in ("view", "reshape") and len(node.args) >= 2:
            sizes = node.args[1:] if not isinstance(node.args[1], (list, tuple)) else node.args[1]
            if len(sizes) == 4 and isinstance(sizes[-1], int) and sizes[-1] > 0:
                return sizes[-1]
        node = node.args[0] if node.args else None
    return None
