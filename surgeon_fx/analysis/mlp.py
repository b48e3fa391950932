"""Match MLP blocks: linear sites on either side of an activation.

The pattern, from the down projection backwards::

    down(act(up(x)))                    -> mlp_up, mlp_down
    down(act(gate(x)) * up(x))          -> mlp_gate, mlp_up, mlp_down
    down(act(g) * u), g, u = gate_up(x) -> mlp_gate_up, mlp_down

The walk from the down projection's input goes up through elementwise operations
only and stops at linear sites. At least one activation must lie on the way; the
site whose path crosses it is the gate when there are two. The block must map the
hidden size back to itself (``down.out_features == up.in_features``), which keeps a
pooler followed by a classifier out.
"""

from __future__ import annotations

from collections import deque

from torch import fx

from ._module_ops import op_kind
from .linear_sites import LinearSite

ACTIVATIONS = {
    "gelu", "silu", "relu", "relu6", "tanh", "sigmoid", "erf", "hardswish", "hardsigmoid",
    "mish", "elu", "selu", "leaky_relu", "softplus", "quick_gelu", "celu", "glu",
}
_ELEMENTWISE = ACTIVATIONS | {
    "mul", "add", "sub", "div", "truediv", "pow", "neg", "exp", "sqrt", "rsqrt", "clamp",
    "_to_copy", "to", "float", "half", "bfloat16", "type_as", "dropout", "native_dropout",
    "getitem", "split", "split_with_sizes", "chunk", "slice", "narrow", "contiguous",
    "clone", "alias", "detach", "view", "reshape", "_unsafe_view", "copy",
}
_SPLITS = {"split", "split_with_sizes", "chunk", "slice", "narrow", "getitem"}
_MAX_WALK = 96


def assign_mlp_roles(sites: list[LinearSite], sites_by_node: dict[fx.Node, LinearSite]) -> None:
    """Give the MLP roles to sites that have no role yet, in place."""
    for down in sites:
        if down.role != "other":
            continue
        region = _elementwise_region(down.input, sites_by_node)
        if region is None:
            continue
        nodes, sources = region
        activated = _sites_behind_activation(nodes, sites_by_node)
        if not activated or any(s.role != "other" or s is down for s in sources):
            continue
        if any(s.in_features != down.out_features for s in sources):
            continue
        roles = _mlp_roles(sources, activated, nodes, down)
        if roles is None:
            continue
        for site, role in roles.items():
            site.role = role
        down.role = "mlp_down"


def _mlp_roles(sources, activated, nodes, down) -> dict[LinearSite, str] | None:
    if len(sources) == 1:
        site = sources[0]
        fused = any(op_kind(n) in _SPLITS - {"getitem"} for n in nodes)
        if fused and site.out_features == 2 * down.in_features:
            return {site: "mlp_gate_up"}
        if site.out_features == down.in_features:
            return {site: "mlp_up"}
        return None
    if len(sources) == 2 and len(activated) == 1:
        if any(s.out_features != down.in_features for s in sources):
            return None
        gate = activated[0]
        up = sources[0] if sources[1] is gate else sources[1]
        return {gate: "mlp_gate", up: "mlp_up"}
    return None


def _elementwise_region(start: fx.Node, sites_by_node) -> tuple[set[fx.Node], list[LinearSite]] | None:
    """Return the elementwise nodes above ``start`` and the linear sites bounding them.

    Returns ``None`` when the region reaches an operation that is neither
    elementwise, a parameter nor a linear site (a norm, an attention op, an input).
    """
    nodes: set[fx.Node] = set()
    sources: list[LinearSite] = []
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if not isinstance(node, fx.Node) or node in nodes:
            continue
        site = sites_by_node.get(node)
        if site is not None:
            if site not in sources:
                sources.append(site)
            continue
        if node.op == "get_attr":
            continue
        if op_kind(node) not in _ELEMENTWISE or len(nodes) >= _MAX_WALK:
            return None
        nodes.add(node)
        queue.extend(node.args)
    return nodes, sources


def _sites_behind_activation(nodes: set[fx.Node], sites_by_node) -> list[LinearSite]:
    """Return the sites that feed an activation inside the region ``nodes``."""
    found: list[LinearSite] = []
    queue = deque(n for n in nodes if op_kind(n) in ACTIVATIONS)
    seen: set[fx.Node] = set()
    while queue:
        node = queue.popleft()
        if not isinstance(node, fx.Node) or node in seen:
            continue
        seen.add(node)
        site = sites_by_node.get(node)
        if site is not None:
            if site not in found:
                found.append(site)
        elif node in nodes:
            queue.extend(node.args)
    return found
