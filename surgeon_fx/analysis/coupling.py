"""Coupling groups: the channels that structured pruning must remove together.

Notation. A *slot* is one axis of one tensor, or an evenly divided section of it.
A *group* couples slots and counts *units* (MLP neurons, query heads, hidden
channels). Removing unit ``u`` of a group removes, from every slot, the indices
``offset + u * width`` to ``offset + (u + 1) * width - 1`` of the slot's axis. Slots
marked ``per="kv"`` count key/value heads instead, and lose kv head ``g`` only when
every query head ``u`` with ``u // (num_heads // num_kv_heads) == g`` goes.

Worked example, tiny Llama, layer 0 (4 query heads, 2 key/value heads, head_dim 16)::

    heads layer 0: 4 units
      layers.0.self_attn.q_proj[out]  width 16          head u -> rows 16u .. 16u+15
      layers.0.self_attn.k_proj[out]  width 16, per kv  kv head u // 2
      layers.0.self_attn.v_proj[out]  width 16, per kv
      layers.0.self_attn.o_proj[in]   width 16          head u -> columns 16u .. 16u+15

The groups come from a networkx graph whose vertices are slots and whose edges
join slots that the FX graph or the analysis couples. Heads couple q/k/v (or the
sections of a fused projection) with the output projection. MLP neurons couple
up/gate (or both halves of a fused gate_up) with down. The residual stream is the
third kind. The
residual stream is found by following the hidden dimension through the graph from
the input of the first projection, up to every embedding, norm, class token,
position table and projection that reads or writes it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import networkx as nx
import sympy
import torch
from torch import fx

from .._fx_utils import node_shape, op_name
from .attention import AttentionOp
from .linear_sites import LinearSite
from .mlp import _elementwise_region

UNITS = ("mlp_neurons", "heads", "hidden")

# Operations whose output dims line up with their inputs' dims from the right, with
# broadcasting. A hidden channel passes through them unchanged.
_ELEMENTWISE = {
    "add", "sub", "mul", "div", "truediv", "neg", "pow", "rsqrt", "sqrt", "exp", "tanh",
    "gelu", "silu", "relu", "sigmoid", "erf", "_to_copy", "to", "type_as", "clone",
    "contiguous", "alias", "detach", "dropout", "lift_fresh_copy", "copy", "float", "half",
    "bfloat16", "where", "masked_fill",
}
# Users that only check or read metadata of a tensor.
_IGNORED_USERS = {"_assert_tensor_metadata", "sym_size", "size", "sym_numel", "sym_stride"}
_NORMS = {"layer_norm", "rms_norm"}
# Roles whose input is the residual stream: a walk of the hidden size starts there.
_HIDDEN_SEEDS = ("q", "qkv", "mlp_up", "mlp_gate", "mlp_gate_up")


@dataclass(frozen=True)
class Slot:
    """One axis of a tensor coupled to a group.

    ``kind`` is ``"site"`` (``target`` is a linear site path, ``axis`` is ``"out"`` for
    weight rows and bias, ``"in"`` for weight columns) or ``"param"`` (``target`` is
    the dotted path of a parameter or buffer and ``axis`` a dimension of it).
    """

    kind: str
    target: str
    axis: int | str
    offset: int = 0
    width: int = 1
    per: str = "unit"  # "unit", or "kv" for key/value slots of a grouped-query attention

    def __str__(self) -> str:
        extra = []
        if self.offset:
            extra.append(f"offset {self.offset}")
        if self.width != 1:
            extra.append(f"width {self.width}")
        if self.per != "unit":
            extra.append(f"per {self.per}")
        suffix = f"  ({', '.join(extra)})" if extra else ""
        return f"{self.target}[{self.axis}]{suffix}"


@dataclass(eq=False)
class CouplingGroup:
    """Channels of several tensors that are kept or removed together, one unit at a time.

    ``unsupported`` gives the reason when the group was found but cannot be pruned.
    """

    unit: str
    size: int
    slots: list[Slot]
    sites: list[LinearSite]
    layer: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    attention: AttentionOp | None = field(default=None, repr=False)
    norm_nodes: list[fx.Node] = field(default_factory=list, repr=False)
    unsupported: str | None = None
    tower: str | None = None  # tower name of a hidden-size group
    block: str | None = None  # stack prefix of that tower
    norm_modules: list[str] = field(default_factory=list)  # module paths of the norms (live models)

    @property
    def name(self) -> str:
        if self.unit == "hidden" and self.tower is not None and self.tower != self.block:
            return f"hidden ({self.tower})"
        return self.unit if self.layer is None else f"{self.unit} layer {self.layer}"

    @property
    def queries_per_kv(self) -> int:
        """Query heads sharing one key/value head (1 without grouped-query attention)."""
        if self.unit != "heads" or not self.num_kv_heads:
            return 1
        return self.size // self.num_kv_heads

    def kept_kv_heads(self, kept_units: list[int]) -> list[int]:
        return sorted({u // self.queries_per_kv for u in kept_units})

    def slot_indices(self, slot: Slot, kept_units: list[int]) -> list[int]:
        """Return the kept indices along ``slot``'s axis, ascending, for these units."""
        units = self.kept_kv_heads(kept_units) if slot.per == "kv" else kept_units
        return [slot.offset + u * slot.width + j for u in units for j in range(slot.width)]

    def unit_count(self, slot: Slot) -> int:
        return self.num_kv_heads if slot.per == "kv" else self.size

    def __str__(self) -> str:
        header = f"{self.name}: {self.size} units"
        if self.unit == "heads":
            header += f" ({self.num_kv_heads} kv heads, head_dim {self.head_dim})"
        if self.unsupported:
            header += f"  [cannot prune: {self.unsupported}]"
        return "\n  ".join([header] + [str(s) for s in self.slots])


def build_coupling_graph(analysis) -> nx.Graph:
    """Return the coupling graph of ``analysis``: slots as vertices, couplings as edges.

    Every vertex has the attribute ``group`` (a :class:`CouplingGroup`); the
    connected components are the groups.
    """
    graph = nx.Graph()
    for group in _mlp_groups(analysis) + _head_groups(analysis) + _hidden_groups(analysis):
        first = group.slots[0]
        for slot in group.slots:
            graph.add_node(slot, group=group)
            graph.add_edge(first, slot)
    return graph


def find_groups(analysis) -> list[CouplingGroup]:
    """Return the coupling groups of ``analysis``: MLP neurons, heads, then hidden size."""
    graph = build_coupling_graph(analysis)
    groups: list[CouplingGroup] = []
    for component in nx.connected_components(graph):
        group = graph.nodes[next(iter(component))]["group"]
        if group not in groups:
            groups.append(group)
    order = {unit: i for i, unit in enumerate(UNITS)}
    return sorted(groups, key=lambda g: (order[g.unit], -1 if g.layer is None else g.layer))


# --- MLP neurons ---------------------------------------------------------------


def _mlp_groups(analysis) -> list[CouplingGroup]:
    by_node = {site.node: site for site in analysis.sites}
    groups = []
    for down in analysis.sites_with_role("mlp_down"):
        region = _elementwise_region(down.input, by_node)
        if region is None:
            continue
        _, sources = region
        neurons = down.in_features
        slots = []
        for site in sources:
            if site.role == "mlp_gate_up":
                # Both halves of the fused output lose neuron u: rows u and neurons + u.
                slots += [Slot("site", site.path, "out"), Slot("site", site.path, "out", offset=neurons)]
            else:
                slots.append(Slot("site", site.path, "out"))
        slots.append(Slot("site", down.path, "in"))
        groups.append(CouplingGroup("mlp_neurons", neurons, slots, sources + [down], layer=down.layer))
    return groups


# --- attention heads -----------------------------------------------------------


def _head_groups(analysis) -> list[CouplingGroup]:
    groups = []
    for op in analysis.attention:
        groups.append(_head_group(op))
    return groups


def _head_group(op: AttentionOp) -> CouplingGroup:
    heads, kv_heads, head_dim = op.num_heads, op.num_kv_heads, op.head_dim
    sites = op.sites
    group = CouplingGroup("heads", heads or 0, [], sites, layer=op.layer, num_kv_heads=kv_heads,
                          head_dim=head_dim, attention=op)
    if not heads or not kv_heads or not head_dim or heads % kv_heads:
        group.unsupported = f"head geometry unknown (heads={heads}, kv_heads={kv_heads}, head_dim={head_dim})"
        group.slots = [Slot("site", s.path, "out") for s in sites]
        return group
    if op.fused_qkv:
        offsets = _fused_offsets(op) or (0, heads * head_dim, (heads + kv_heads) * head_dim)
        q_slot = Slot("site", op.q.path, "out", offsets[0], head_dim)
        k_slot = Slot("site", op.q.path, "out", offsets[1], head_dim, per="kv")
        v_slot = Slot("site", op.q.path, "out", offsets[2], head_dim, per="kv")
    else:
        q_slot = Slot("site", op.q.path, "out", 0, head_dim)
        k_slot = Slot("site", op.k.path, "out", 0, head_dim, per="kv")
        v_slot = Slot("site", op.v.path, "out", 0, head_dim, per="kv")
    group.slots = [q_slot, k_slot, v_slot]
    if op.out is None:
        group.unsupported = "no output projection found after the attention op"
    else:
        group.slots.append(Slot("site", op.out.path, "in", 0, head_dim))
    return group


def _fused_offsets(op: AttentionOp) -> tuple[int, int, int] | None:
    """Read where q, k and v start in a fused projection's output from its slices."""
    offsets = []
    for arg in op.node.args[:3]:
        offset = _section_start(arg, op.q.node)
        if offset is None:
            return None
        offsets.append(offset)
    return tuple(offsets)


def _section_start(start: object, site_node: fx.Node) -> int | None:
    node = start
    last_offset = None
    for _ in range(32):
        if not isinstance(node, fx.Node):
            return None
        if node is site_node:
            return last_offset
        name = op_name(node)
        if name == "slice" and len(node.args) >= 3 and _along_last_dim(node):
            last_offset = int(node.args[2])
        elif name == "getitem" and isinstance(node.args[0], fx.Node):
            split = node.args[0]
            sizes = _split_sizes(split) if _along_last_dim(split) else None
            if sizes is not None:
                last_offset = sum(sizes[: node.args[1]])
            node = split.args[0]
            continue
        node = node.args[0] if node.args else None
    return None


def _along_last_dim(node: fx.Node) -> bool:
    """Whether a slice or split cuts the last dimension of its input, where the sections lie.

    A split along another dimension (the sequence, cut into attention chunks) says
    nothing about where q, k and v start.
    """
    shape = node_shape(node.args[0])
    if shape is None:
        return False
    name = op_name(node)
    if name in ("split", "split_with_sizes", "chunk"):
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    else:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return isinstance(dim, int) and dim % len(shape) == len(shape) - 1


def _split_sizes(split: fx.Node) -> list[int] | None:
    name = op_name(split)
    shape = node_shape(split.args[0])
    if name == "split_with_sizes":
        return list(split.args[1])
    if name in ("split", "chunk") and shape is not None:
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        total = int(shape[dim])
        size = split.args[1] if name == "split" else math.ceil(total / split.args[1])
        return [min(size, total - i) for i in range(0, total, size)]
    return None


# --- hidden size ---------------------------------------------------------------


@dataclass
class HiddenWalk:
    """Result of a walk along the hidden dimension: the slots, sites and norms it couples.

    With ``boundary`` set (a walk inside one part of a blockwise capture), the walk
    stops at the part's inputs and output and lists them in ``entries`` and
    ``exits`` instead of reporting problems. It then also follows a reshape that
    folds the hidden dimension into a wider trailing one right before a linear
    layer, such as a patch merger's ``view(-1, 4 * hidden)``.
    """

    hidden: int
    by_node: dict
    boundary: bool = False
    slots: list[Slot] = field(default_factory=list)
    sites: list[LinearSite] = field(default_factory=list)
    norm_nodes: list[fx.Node] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    entries: list[fx.Node] = field(default_factory=list)
    exits: list[fx.Node] = field(default_factory=list)

    def add_site(self, site: LinearSite, axis: str, offset: int = 0) -> None:
        slot = Slot("site", site.path, axis, offset)
        if slot not in self.slots:
            self.slots.append(slot)
        if site not in self.sites:
            self.sites.append(site)

    def add_param(self, node: fx.Node, dim: int) -> None:
        slot = Slot("param", node.target, dim)
        if slot not in self.slots:
            self.slots.append(slot)


def _hidden_groups(analysis) -> list[CouplingGroup]:
    """Return one hidden-size group per tower, each walked from its first projection."""
    groups = []
    towers = list(dict.fromkeys(s.tower for s in analysis.sites if s.role in _HIDDEN_SEEDS))
    for tower in towers:
        seeds = [s for s in analysis.sites if s.tower == tower and s.role in _HIDDEN_SEEDS]
        if not seeds:
            continue
        seed = seeds[0]
        walk = walk_hidden(seed.input, seed.in_features, {site.node: site for site in analysis.sites})
        group = CouplingGroup("hidden", walk.hidden, walk.slots, walk.sites, norm_nodes=walk.norm_nodes)
        group.tower, group.block = tower, seed.block
        if walk.problems:
            group.unsupported = "; ".join(dict.fromkeys(walk.problems))
        groups.append(group)
    return groups


def walk_hidden(start: fx.Node, hidden: int, by_node: dict, *, boundary: bool = False) -> HiddenWalk:
    """Follow the hidden dimension (the last one of ``start``) through the graph, up and down.

    ``by_node`` maps the graph's linear nodes to their sites.
    """
    walk = HiddenWalk(hidden, by_node, boundary)
    shape = node_shape(start)
    queue = deque([(start, len(shape) - 1)])
    seen: set[tuple[fx.Node, int]] = set()
    while queue:
        node, dim = queue.popleft()
        if (node, dim) in seen:
            continue
        seen.add((node, dim))
        shape = node_shape(node)
        if shape is None or not _same(shape[dim], walk.hidden):
            walk.problems.append(f"node {node.name} carries the hidden dimension with an unexpected size")
            continue
        # Down: every user of this tensor.
        for user in node.users:
            queue.extend(_follow_user(walk, node, dim, user))
        # Up: the arguments of this node that carry the same channels.
        queue.extend(_follow_args(walk, node, dim))
    return walk


def _follow_user(walk: HiddenWalk, node: fx.Node, dim: int, user: fx.Node) -> list:
    name = op_name(user)
    if user.op == "output":
        if walk.boundary and node not in walk.exits:
            walk.exits.append(node)
        return []
    if name in _IGNORED_USERS or (user.op == "call_module" and str(user.target).startswith("_guards_fn")):
        return []  # export's check of the example's shapes reads every input
    site = walk.by_node.get(user)
    if site is not None:
        if site.input is node:
            walk.add_site(site, "in")
        else:
            walk.problems.append(
                f"{site.path} uses a hidden-size tensor as its weight (tied weights; untie them first with "
                f"module.weight = torch.nn.Parameter(module.weight.clone()) on {site.path})"
            )
        return []
    if name == "mean" and _reduces(user, node, dim):
        walk.norm_nodes.append(user)  # RMSNorm: mean(x ** 2, -1)
        return []
    links = dim_links(user)
    if links is None:
        walk.problems.append(f"operation {name} ({user.name}) on the hidden dimension is not supported")
        return []
    found = [(user, out_dim) for arg, in_dim, out_dim in links if arg is node and in_dim == dim]
    if not found and walk.boundary and _fold_into_sites(walk, node, dim, user):
        return []
    if not found:
        walk.problems.append(f"operation {name} ({user.name}) mixes or reduces the hidden dimension")
    if name in _NORMS and user not in walk.norm_nodes:
        walk.norm_nodes.append(user)
    return found


def _fold_into_sites(walk: HiddenWalk, node: fx.Node, dim: int, fold: fx.Node) -> bool:
    """Couple a reshape from trailing size ``hidden`` to ``m * hidden`` read only by linear layers.

    In row-major order, hidden channel ``c`` lands in the columns ``k * hidden + c``
    for ``k < m`` of each reading layer: one slot per ``k``.
    """
    shape, out = node_shape(node), node_shape(fold)
    if op_name(fold) not in ("view", "reshape", "_unsafe_view", "flatten") or shape is None or not out:
        return False
    if dim != len(shape) - 1 or not isinstance(out[-1], int) or out[-1] % walk.hidden or out[-1] == walk.hidden:
        return False
    readers = [walk.by_node.get(user) for user in fold.users]
    if not readers or any(site is None or site.input is not fold for site in readers):
        return False
    for site in readers:
        for k in range(out[-1] // walk.hidden):
            walk.add_site(site, "in", offset=k * walk.hidden)
    return True


def _follow_args(walk: HiddenWalk, node: fx.Node, dim: int) -> list:
    site = walk.by_node.get(node)
    if site is not None:
        walk.add_site(site, "out")
        return []
    if node.op == "get_attr":
        walk.add_param(node, dim)
        return []
    if node.op == "placeholder":
        part = node.meta.get("surgeon_fx_part")
        if walk.boundary:
            if node not in walk.entries:
                walk.entries.append(node)
        elif part is not None:
            walk.problems.append(
                f"the hidden dimension enters {part} as a recorded input of a blockwise capture, so the "
                "residual stream between blocks (embeddings, norms, heads) is not in the graph"
            )
        else:
            walk.problems.append(f"input {node.name} carries the hidden dimension (inputs_embeds?)")
        return []
    links = dim_links(node)
    if links is None:
        walk.problems.append(f"operation {op_name(node)} ({node.name}) on the hidden dimension is not supported")
        return []
    return [(arg, in_dim) for arg, in_dim, out_dim in links if out_dim == dim]


def _reduces(user: fx.Node, node: fx.Node, dim: int) -> bool:
    if user.args[0] is not node or len(user.args) < 2:
        return False
    rank = len(node_shape(node))
    dims = user.args[1] if isinstance(user.args[1], (list, tuple)) else [user.args[1]]
    return [d % rank for d in dims] == [dim]


def dim_links(node: fx.Node) -> list[tuple[fx.Node, int, int]] | None:
    """Return ``(arg, arg_dim, out_dim)`` for each dimension ``node`` passes through unchanged.

    Returns ``None`` for an operation whose dimension mapping is not known.
    """
    name = op_name(node)
    out = node_shape(node)
    if out is None:
        return None
    rank = len(out)
    tensors = _tensor_args(node)
    if name in _ELEMENTWISE or name == "expand":
        links = []
        for arg in tensors:
            shape = node_shape(arg)
            for o in range(rank):
                i = o - (rank - len(shape))
                if i >= 0 and _same(shape[i], out[o]):
                    links.append((arg, i, o))
        return links
    x = node.args[0] if node.args else None
    in_shape = node_shape(x)
    if name in ("transpose", "permute", "t"):
        perm = list(range(rank))
        if name == "permute":
            perm = [d % rank for d in node.args[1]]
        else:
            a, b = (node.args[1] % rank, node.args[2] % rank) if name == "transpose" else (0, 1)
            perm[a], perm[b] = perm[b], perm[a]
        return [(x, perm[o], o) for o in range(rank)]
    if name in ("view", "reshape", "_unsafe_view", "unflatten", "flatten", "unsqueeze", "squeeze"):
        return [(x, i, o) for i, o in _one_to_one_dims(in_shape, out)]
    if name in ("slice", "select", "narrow", "index_select"):
        cut = node.args[1] % len(in_shape) if len(node.args) > 1 else 0
        links = []
        for i in range(len(in_shape)):
            if i == cut:
                continue
            o = i - 1 if name == "select" and i > cut else i
            links.append((x, i, o))
        return links
    if name == "cat":
        cat_dim = (node.args[1] if len(node.args) > 1 else 0) % rank
        return [(t, d, d) for t in node.args[0] for d in range(rank) if d != cat_dim]
    if name == "layer_norm":
        links = [(x, d, d) for d in range(rank)]
        links += [(w, 0, rank - 1) for w in node.args[2:4] if isinstance(w, fx.Node)]
        return links
    if name == "embedding":
        return [(node.args[0], 1, rank - 1)]
    if name in ("conv1d", "conv2d", "conv3d", "convolution"):
        return [(w, 0, 1) for w in node.args[1:3] if isinstance(w, fx.Node)]
    return None


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node) and node_shape(a) is not None]


def as_expr(size) -> sympy.Expr:
    """Return a dimension size as a sympy expression (symbols for dynamic sizes)."""
    if isinstance(size, torch.SymInt):
        return size.node.expr
    if isinstance(size, sympy.Expr):
        return size
    return sympy.Integer(int(size))


def _same(a, b) -> bool:
    return sympy.simplify(as_expr(a) - as_expr(b)) == 0


def _divides(a, b) -> bool:
    """Whether ``b / a`` is a polynomial in the size symbols (``a`` divides ``b``)."""
    _, denominator = sympy.fraction(sympy.cancel(as_expr(b) / as_expr(a)))
    return denominator == 1


def _one_to_one_dims(in_shape, out_shape) -> list[tuple[int, int]]:
    """Pair the input and output dims of a reshape that keep their size and position.

    Dims are grouped left to right by equal products; a group of one input dim and
    one output dim is a dimension the reshape leaves alone.
    """
    pairs = []
    i = o = 0
    while i < len(in_shape) and o < len(out_shape):
        if _same(in_shape[i], out_shape[o]) and not _same(in_shape[i], 1):
            pairs.append((i, o))
            i, o = i + 1, o + 1
            continue
        span = _match_group(in_shape, out_shape, i, o)
        if span is None:
            break
        i, o = span
    return pairs


def _match_group(in_shape, out_shape, i: int, o: int) -> tuple[int, int] | None:
    """Advance over one group of dims whose products agree; return the next (i, o)."""
    left, right = as_expr(in_shape[i]), as_expr(out_shape[o])
    i, o = i + 1, o + 1
    for _ in range(len(in_shape) + len(out_shape)):
        if sympy.simplify(left - right) == 0:
            return i, o
        if _divides(left, right) and i < len(in_shape):
            left = left * as_expr(in_shape[i])
            i += 1
        elif o < len(out_shape):
            right = right * as_expr(out_shape[o])
            o += 1
        else:
            return None
    return None
