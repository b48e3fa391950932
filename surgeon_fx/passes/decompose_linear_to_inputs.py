"""``decompose_linear_to_inputs``: low-rank linears whose factors are graph inputs.

The ``torch.compile`` backend uses this pass instead of ``decompose_linear``. A
Dynamo graph receives parameters as placeholders and can be reused for another
instance of the same block class, so the factors must arrive as inputs too, never
as constants or submodules of the graph module.
"""

from __future__ import annotations

import torch
from torch import fx

from ..analysis import LinearSite
from ..layers import lrd_num_params
from ..plan import LRDAction
from .manager import PassResult, Rewriter

_LINEAR = torch._C._nn.linear


def decompose_linear_to_inputs(actions: list[LRDAction], factors: list[tuple[torch.Tensor, torch.Tensor]]):
    """Return a pass that rewrites each action's site to take its factors as inputs.

    ``linear(x, W, b)`` (or ``addmm(b, x, W)`` with ``W`` stored as ``(in, out)``)
    becomes ``linear(linear(x, v_i), u_i, b)``, with placeholders ``surgeon_fx_v_i``
    and ``surgeon_fx_u_i`` appended to the graph's inputs in the order of
    ``actions``: ``v_0, u_0, v_1, u_1, ...``. ``factors[i]`` is ``(u_i, v_i)``; its
    shapes and dtypes give the placeholders' example values.
    """

    def run(gm: fx.GraphModule, rewriter: Rewriter) -> PassResult:
        graph = gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        fake_mode = _fake_mode(placeholders)
        last = placeholders[-1]
        for index, (action, (u, v)) in enumerate(zip(actions, factors)):
            v_node = _append_placeholder(graph, last, f"surgeon_fx_v_{index}", v, fake_mode)
            u_node = _append_placeholder(graph, v_node, f"surgeon_fx_u_{index}", u, fake_mode)
            last = u_node
            _replace_site(graph, action, v_node, u_node, fake_mode)
            site = action.site
            rewriter.record(
                path=site.path,
                role=site.role,
                layer=site.layer,
                method="lrd:svd",
                rank=action.rank,
                params_before=site.num_params,
                params_after=lrd_num_params(site.in_features, site.out_features, action.rank, site.has_bias),
            )
        return PassResult(gm, modified=bool(actions))

    return run


def _append_placeholder(graph: fx.Graph, after: fx.Node, name: str, value: torch.Tensor, fake_mode) -> fx.Node:
    with graph.inserting_after(after):
        node = graph.placeholder(name)
    if fake_mode is not None:
        # Static: a symbolic size here would have no source for Dynamo to guard on.
        node.meta["example_value"] = fake_mode.from_tensor(value, static_shapes=True)
    # AOTAutograd (torch 2.13) reads these from every placeholder of a Dynamo graph.
    # The factors have no user-code source and are static inputs, like parameters.
    node._dynamo_source = None
    node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
    return node


def _replace_site(graph: fx.Graph, action: LRDAction, v: fx.Node, u: fx.Node, fake_mode) -> None:
    site = action.site
    with graph.inserting_before(site.node):
        hidden = graph.call_function(_LINEAR, (site.input, v))  # (..., rank)
        output = graph.call_function(_LINEAR, (hidden, u, site.bias_node))  # (..., out_features)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in site.node.meta:
            hidden.meta[key] = site.node.meta[key]
    output.meta = dict(site.node.meta)
    example = _fake_linear(fake_mode, site.input, v)
    if example is not None:
        hidden.meta["example_value"] = example
    site.node.replace_all_uses_with(output)
    graph.erase_node(site.node)


def _fake_mode(placeholders: list[fx.Node]):
    for node in placeholders:
        value = node.meta.get("example_value")
        mode = getattr(value, "fake_mode", None)
        if mode is not None:
            return mode
    return None


def _fake_linear(fake_mode, x: fx.Node, v: fx.Node) -> torch.Tensor | None:
    x_value = x.meta.get("example_value") if isinstance(x, fx.Node) else None
    v_value = v.meta.get("example_value")
    if fake_mode is None or x_value is None or v_value is None:
        return None
    with fake_mode:
        return _LINEAR(x_value, v_value)


def mask_linear_inputs(sites: list[LinearSite], tensors: list[tuple[torch.Tensor, torch.Tensor | None]]):
    """Return a pass that makes each site read a masked weight and bias from new inputs.

    Soft pruning in a Dynamo graph: the weight (and bias) arguments of each site's
    linear node become placeholders ``surgeon_fx_w_i`` (and ``surgeon_fx_b_i``),
    appended to the graph's inputs after any factors. ``tensors[i]`` is the masked
    ``(weight, bias)`` of ``sites[i]``, in the stored layout, and gives the
    placeholders' example values. The graph keeps its shapes.
    """

    def run(gm: fx.GraphModule, rewriter: Rewriter) -> PassResult:
        graph = gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        fake_mode = _fake_mode(placeholders)
        last = placeholders[-1]
        for index, (site, (weight, bias)) in enumerate(zip(sites, tensors)):
            last = _append_placeholder(graph, last, f"surgeon_fx_w_{index}", weight, fake_mode)
            site.node.replace_input_with(site.weight_node, last)
            if bias is not None:
                last = _append_placeholder(graph, last, f"surgeon_fx_b_{index}", bias, fake_mode)
                site.node.replace_input_with(site.bias_node, last)
            rewriter.record(path=site.path, role=site.role, layer=site.layer, method="prune:soft")
        return PassResult(gm, modified=bool(sites))

    return run
