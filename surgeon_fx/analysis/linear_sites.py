"""Find the linear operations of a graph module, whatever dialect it is written in.

A linear operation reaches this library in one of five forms:

==========================================  =====================================
graph                                        node
==========================================  =====================================
``torch.fx.symbolic_trace``                  ``call_module`` on ``nn.Linear`` or
                                             GPT-2's ``Conv1D``
``ExportedProgram.module()``                 ``aten.linear.default(x, w, b)`` with
                                             ``get_attr`` weights
the same, for GPT-2's ``Conv1D``             ``aten.addmm.default(b, x, w)`` with
                                             ``w`` stored as ``(in, out)``
Dynamo (inside a ``torch.compile`` backend)  ``torch._C._nn.linear(x, w, b)`` with
                                             placeholder weights
==========================================  =====================================

:func:`find_linear_sites` turns each into one :class:`LinearSite`, so the rest of the
library never looks at the dialect again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .._fx_utils import fetch_attr, node_module_path, op_name

ROLES = ("q", "k", "v", "qkv", "attn_out", "mlp_up", "mlp_gate", "mlp_gate_up", "mlp_down", "other")
ATTENTION_ROLES = ("q", "k", "v", "qkv", "attn_out")
MLP_ROLES = ("mlp_up", "mlp_gate", "mlp_gate_up", "mlp_down")

# A repeated block contains its layers, so the index must be followed by more path:
# in "mlp.0" (an nn.Sequential holding a Linear) the 0 is not a block index.
_LAYER_INDEX = re.compile(r"^(?P<block>.+?)\.(?P<index>\d+)\.")


@dataclass(eq=False)
class LinearSite:
    """One linear operation of a graph module and the layer it came from.

    ``weight_layout`` is ``"out_in"`` for ``nn.Linear`` weights of shape
    ``(out_features, in_features)`` and ``"in_out"`` for GPT-2's ``Conv1D``.
    """

    path: str
    node: fx.Node
    input: fx.Node
    in_features: int
    out_features: int
    weight_layout: str = "out_in"
    weight_node: fx.Node | None = None
    bias_node: fx.Node | None = None
    role: str = "other"
    layer: int | None = None
    block: str | None = None
    tower: str | None = None  # see surgeon_fx.analysis.towers
    attention: object | None = field(default=None, repr=False)

    @property
    def nodes(self) -> list[fx.Node]:
        """The graph nodes of this site: the linear op and its weight and bias."""
        return [n for n in (self.node, self.weight_node, self.bias_node) if n is not None]

    @property
    def has_bias(self) -> bool:
        if self.node.op == "call_module":
            module = fetch_attr(self.node.graph.owning_module, self.node.target)
            return getattr(module, "bias", None) is not None
        return self.bias_node is not None

    @property
    def num_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.has_bias else 0)

    def weight(self, gm: nn.Module) -> torch.Tensor:
        """Return the weight as ``(out_features, in_features)``, transposing ``Conv1D``."""
        weight, _ = self.tensors(gm)
        return weight.t() if self.weight_layout == "in_out" else weight

    def bias(self, gm: nn.Module) -> torch.Tensor | None:
        return self.tensors(gm)[1]

    def tensors(self, gm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the stored weight (in its own layout) and bias."""
        if self.node.op == "call_module":
            module = fetch_attr(gm, self.node.target)
            return module.weight, module.bias
        weight = _tensor_of(gm, self.weight_node)
        bias = _tensor_of(gm, self.bias_node) if self.bias_node is not None else None
        return weight, bias

    def __repr__(self) -> str:
        return (
            f"LinearSite(path={self.path!r}, role={self.role!r}, layer={self.layer}, "
            f"in_features={self.in_features}, out_features={self.out_features})"
        )


def _tensor_of(gm: nn.Module, node: fx.Node) -> torch.Tensor:
    if node.op == "get_attr":
        return fetch_attr(gm, node.target)
    example = node.meta.get("example_value", node.meta.get("val"))
    if node.op == "placeholder" and isinstance(example, torch.Tensor):
        # Dynamo graphs pass parameters as inputs; the backend binds real tensors.
        bound = node.meta.get("surgeon_fx_tensor")
        if bound is not None:
            return bound
    raise TypeError(f"cannot read a tensor from node {node.name!r} ({node.op})")


def split_layer(path: str) -> tuple[str | None, int | None]:
    """Split ``model.layers.3.mlp.up_proj`` into ``("model.layers", 3)``."""
    match = _LAYER_INDEX.match(path)
    if match is None:
        return None, None
    return match.group("block"), int(match.group("index"))


def find_linear_sites(gm: fx.GraphModule) -> list[LinearSite]:
    """Return one :class:`LinearSite` per linear operation of ``gm``, in graph order."""
    sites = []
    paths: set[str] = set()
    for node in gm.graph.nodes:
        site = _match_linear(gm, node)
        if site is None:
            continue
        if site.path in paths:
            # A module called twice (or shared weights) gives one site per call.
            site.path = f"{site.path}@{node.name}"
        paths.add(site.path)
        site.block, site.layer = split_layer(site.path)
        sites.append(site)
    return sites


def _match_linear(gm: fx.GraphModule, node: fx.Node) -> LinearSite | None:
    if node.op == "call_module":
        return _match_linear_module(gm, node)
    if node.op != "call_function":
        return None
    name = op_name(node)
    if name == "linear":
        return _match_linear_function(gm, node)
    if name == "addmm":
        return _match_addmm(gm, node)
    return None


def _match_linear_module(gm: fx.GraphModule, node: fx.Node) -> LinearSite | None:
    module = fetch_attr(gm, node.target)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not node.args:
        return None
    if isinstance(module, nn.Linear):
        layout = "out_in"
    elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        layout = "in_out"
    else:
        return None
    out_features, in_features = weight.shape if layout == "out_in" else weight.shape[::-1]
    return LinearSite(
        path=node.target,
        node=node,
        input=node.args[0],
        in_features=in_features,
        out_features=out_features,
        weight_layout=layout,
    )


def _match_linear_function(gm: fx.GraphModule, node: fx.Node) -> LinearSite | None:
    args = list(node.args) + [None] * 3
    x = args[0]
    weight = args[1] if args[1] is not None else node.kwargs.get("weight")
    bias = args[2] if args[2] is not None else node.kwargs.get("bias")
    shape = _weight_shape(gm, weight)
    if shape is None or not isinstance(x, fx.Node):
        return None
    return LinearSite(
        path=_site_path(node, weight),
        node=node,
        input=x,
        in_features=shape[1],
        out_features=shape[0],
        weight_node=weight,
        bias_node=bias if isinstance(bias, fx.Node) else None,
    )


def _match_addmm(gm: fx.GraphModule, node: fx.Node) -> LinearSite | None:
    # addmm(bias, x, w) = x @ w + bias, with w stored as (in_features, out_features).
    if len(node.args) != 3 or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    bias, x, weight = node.args
    shape = _weight_shape(gm, weight)
    bias_shape = _weight_shape(gm, bias, ndim=1)
    if shape is None or bias_shape is None or bias_shape[0] != shape[1]:
        return None
    return LinearSite(
        path=_site_path(node, weight),
        node=node,
        input=x,
        in_features=shape[0],
        out_features=shape[1],
        weight_layout="in_out",
        weight_node=weight,
        bias_node=bias,
    )


def _weight_shape(gm: fx.GraphModule, node: object, ndim: int = 2) -> tuple[int, ...] | None:
    """Return the shape of a parameter node, or ``None`` if it is not a parameter."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        try:
            value = fetch_attr(gm, node.target)
        except AttributeError:
            return None
    elif node.op == "placeholder":
        value = node.meta.get("example_value", node.meta.get("val"))
        if not isinstance(value, nn.Parameter) and not node.meta.get("surgeon_fx_is_param"):
            return None
    else:
        return None
    if not isinstance(value, torch.Tensor) or value.dim() != ndim:
        return None
    return tuple(int(s) for s in value.shape)


def _site_path(node: fx.Node, weight: fx.Node) -> str:
    """Return the module path of a functional linear op.

    The weight's own path wins when it lies below the calling module, because
    ``nn.MultiheadAttention`` calls ``F.linear`` on ``in_proj_weight`` and
    ``out_proj.weight`` from one module. A tied ``lm_head`` reads the embedding's
    weight, so there the calling module's path is kept.
    """
    module_path = node_module_path(node)
    weight_path = None
    # A Dynamo placeholder carries the parameter's name in the model when the
    # backend knows the model. Its module path may then be relative to the frame
    # Dynamo compiled (``self_attn.q_proj`` for ``layers.1.self_attn.q_proj``).
    weight_name = weight.target if weight.op == "get_attr" else weight.meta.get("surgeon_fx_name")
    if isinstance(weight_name, str):
        for suffix in (".weight", "_weight"):
            if weight_name.endswith(suffix):
                weight_path = weight_name[: -len(suffix)]
                break
    if weight_path and (not module_path or f".{module_path}." in f".{weight_path}."):
        return weight_path
    return module_path or weight_path or node.name
