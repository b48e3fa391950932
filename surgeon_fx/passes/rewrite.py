"""Graph edits shared by the passes."""

from __future__ import annotations

from torch import fx, nn

from .._fx_utils import fetch_attr, has_attr
from ..analysis import LinearSite
from .manager import Rewriter


def replace_linear(gm: fx.GraphModule, rewriter: Rewriter, site: LinearSite, module: nn.Module) -> fx.Node:
    """Make ``site`` call ``module``, placed at ``site.path``, and return the new node.

    A ``call_module`` site only needs its submodule swapped. A functional site
    (``aten.linear``, ``addmm``) becomes a ``call_module`` node on the new module;
    the container that held its weight and bias moves into the journal, and their
    ``get_attr`` nodes are erased once unused.
    """
    if site.node.op == "call_module":
        rewriter.swap_module(site.node.target, module)
        return site.node

    graph = gm.graph
    path = site.path
    if has_attr(gm, path) and _other_readers(graph, path, site):
        raise ValueError(f"other nodes read attributes below {path!r}; cannot replace it")
    with graph.inserting_before(site.node):
        new_node = graph.call_module(path, (site.input,))
    new_node.meta = dict(site.node.meta)
    site.node.replace_all_uses_with(new_node)
    graph.erase_node(site.node)
    for param_node in (site.weight_node, site.bias_node):
        if param_node is not None and param_node.op == "get_attr" and not param_node.users:
            graph.erase_node(param_node)
    previous = fetch_attr(gm, path) if has_attr(gm, path) else None
    if previous is not None and not isinstance(previous, nn.Module):
        raise ValueError(f"{path!r} is a {type(previous).__name__}, not a module")
    rewriter.swap_module(path, module)
    return new_node


def _other_readers(graph: fx.Graph, path: str, site: LinearSite) -> bool:
    own = {site.weight_node, site.bias_node}
    prefix = path + "."
    return any(
        n.op == "get_attr" and n.target.startswith(prefix) and n not in own for n in graph.nodes
    )
