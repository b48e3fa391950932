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
    previous = fetch_attr(gm, path) if has_attr(gm, path) else None
    if previous is not None and not isinstance(previous, nn.Module):
        raise ValueError(f"{path!r} is a {type(previous).__name__}, not a module")
    # The module goes in first because Graph.call_module looks its target up. In a
    # Dynamo graph no module exists at the path, since weights are placeholders.
    rewriter.swap_module(path, module)
    with graph.inserting_before(site.node):
        new_node = graph.call_module(path, (site.input,))
    new_node.meta = dict(site.node.meta)
    site.node.replace_all_uses_with(new_node)
    graph.erase_node(site.node)
    for param_node in (site.weight_node, site.bias_node):
        if param_node is None or param_node.op != "get_attr":
            continue
        if not param_node.users:
            graph.erase_node(param_node)
        elif param_node.target.startswith(path + "."):
            # A tied weight, such as an lm_head that shares the token embedding, is
            # still read by other nodes, so point them at another name of the tensor.
            param_node.target = _alias_outside(gm, previous, param_node, path)
    return new_node


def _alias_outside(gm: fx.GraphModule, previous: nn.Module | None, node: fx.Node, path: str) -> str:
    tensor = fetch_attr(previous, node.target[len(path) + 1:]) if previous is not None else None
    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    for name, value in named:
        if value is tensor and not name.startswith(path + "."):
            return name
    readers = [user.name for user in node.users]
    raise ValueError(
        f"{node.target!r} is also read by {readers} and no other attribute refers to that tensor, so "
        f"{path!r} cannot be replaced; exclude it from the plan"
    )


def _other_readers(graph: fx.Graph, path: str, site: LinearSite) -> bool:
    own = {site.weight_node, site.bias_node}
    prefix = path + "."
    return any(
        n.op == "get_attr" and n.target.startswith(prefix) and n not in own for n in graph.nodes
    )
