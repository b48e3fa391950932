"""``surgeon-fx graph MODEL --layer N --out FILE``: draw one block's graph as a PNG.

The drawing holds the FX nodes whose module path lies in block ``N`` (such as
``model.layers.3.``), top to bottom in data-flow order. Linear sites are coloured
by role and attention operations are marked. Values that enter the block from
outside (its input, masks, rotary tables) are grey boxes. Weight reads
(``get_attr``) and export's shape checks are left out.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import networkx as nx
from torch import fx

from .._fx_utils import node_module_path, op_name
from ..analysis import Analysis, analyze
from ..live import capture_for_analysis
from .errors import CommandError
from .models import load_model
from .common import MODEL_HELP, positive_int
from .output import ROLE_ORDER, pyplot, role_color, save_figure

logger = logging.getLogger(__name__)

# Nodes that only check or read tensor metadata; they would crowd the drawing.
_HIDDEN_OPS = {"_assert_tensor_metadata", "_assert_scalar", "sym_size", "sym_numel", "sym_stride",
               "sym_constrain_range_for_size", "getattr"}
ATTENTION_COLOR = "#d62728"
OP_COLOR = "#c7c7c7"
INPUT_COLOR = "#f0f0f0"


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "graph", parents=[common], help="draw one block's FX graph with the sites coloured by role",
        description="Capture MODEL, analyse it, and draw the FX nodes of block N (the nodes whose "
        "module path lies in that layer) as a PNG, with each linear site coloured by its role.",
    )
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--layer", metavar="N", type=int, required=True,
                        help="index of the block to draw, as in the 'layer' column of 'surgeon-fx analyze'")
    parser.add_argument("--out", metavar="FILE", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--dpi", type=positive_int, default=120, metavar="N",
                        help="resolution of the PNG file in dots per inch (default 120)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    loaded = load_model(args.model)
    gm = capture_for_analysis(loaded.model, (), loaded.example_inputs(), calibrated=False)
    analysis = analyze(gm)
    graph = block_graph(analysis, args.layer)
    figure = draw(pyplot(), graph, f"{loaded.name}: block {args.layer}")
    save_figure(figure, args.out, args.dpi)
    sites = sum(1 for _, data in graph.nodes(data=True) if data["kind"] == "site")
    print(f"{args.out}: {graph.number_of_nodes()} nodes, {sites} linear sites")
    return 0


def block_prefix(analysis: Analysis, layer: int) -> str:
    """Return the module path prefix of block ``layer``, such as ``model.layers.3.``."""
    blocks = {s.block for s in analysis.sites if s.layer == layer and s.block is not None}
    if not blocks:
        raise CommandError(f"--layer {layer} is not a block of this model; its layers are {analysis.layers}")
    if len(blocks) > 1:
        # NOTE: models with two stacks (an encoder and a decoder, say) number both from 0;
        # the first stack is drawn.
        logger.warning("layer %d exists in %s; drawing %s", layer, sorted(blocks), sorted(blocks)[0])
    return f"{sorted(blocks)[0]}.{layer}."


def block_graph(analysis: Analysis, layer: int) -> nx.DiGraph:
    """Return the nodes of block ``layer`` as a networkx graph with drawing attributes.

    Every vertex has ``kind`` (``site``, ``attention``, ``op`` or ``input``), ``label``
    and ``depth`` (the longest path from an input, which sets the row).
    """
    prefix = block_prefix(analysis, layer)
    sites = {s.node: s for s in analysis.sites}
    attention = {op.node for op in analysis.attention}
    inside = [n for n in analysis.gm.graph.nodes if _in_block(n, prefix)]
    members = set(inside)
    graph = nx.DiGraph()
    for node in inside:
        graph.add_node(node.name, **_describe(node, sites, attention, prefix))
        for source in node.all_input_nodes:
            if source.op == "get_attr" or op_name(source) in _HIDDEN_OPS:
                continue
            if source not in members and source.name not in graph:
                graph.add_node(source.name, kind="input", label=_short(source.name))
            graph.add_edge(source.name, node.name)
    for name in nx.topological_sort(graph):
        graph.nodes[name]["depth"] = max((graph.nodes[p]["depth"] + 1 for p in graph.predecessors(name)), default=0)
    return graph


def _in_block(node: fx.Node, prefix: str) -> bool:
    if node.op not in ("call_function", "call_module", "call_method") or op_name(node) in _HIDDEN_OPS:
        return False
    path = node_module_path(node)
    return path is not None and f"{path}.".startswith(prefix)


def _describe(node: fx.Node, sites: dict, attention: set, prefix: str) -> dict[str, Any]:
    site = sites.get(node)
    if site is not None:
        return {"kind": "site", "role": site.role, "label": f"{site.role}\n{site.path.removeprefix(prefix)}"}
    if node in attention:
        return {"kind": "attention", "label": op_name(node)}
    return {"kind": "op", "label": _short(op_name(node))}


def _short(text: str, width: int = 18) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def draw(plt, graph: nx.DiGraph, title: str):
    """Return a matplotlib figure of ``graph``, one row per depth, inputs at the top."""
    for name, data in graph.nodes(data=True):
        data["row"] = data["depth"]
    positions = nx.multipartite_layout(graph, subset_key="row", align="horizontal")
    positions = {name: (x, -y) for name, (x, y) in positions.items()}  # inputs at the top
    depth = max((d["depth"] for _, d in graph.nodes(data=True)), default=0) + 1
    width = max(sum(1 for _, d in graph.nodes(data=True) if d["depth"] == row) for row in range(depth))
    figure, axis = plt.subplots(figsize=(max(8.0, 1.9 * width), max(6.0, 0.75 * depth)))
    colors = [_node_color(plt, data) for _, data in graph.nodes(data=True)]
    nx.draw_networkx_edges(graph, positions, ax=axis, arrows=True, arrowsize=8, edge_color="0.55", width=0.8,
                           node_size=900)
    nx.draw_networkx_nodes(graph, positions, ax=axis, node_color=colors, node_size=900, edgecolors="0.3",
                           linewidths=0.5, node_shape="s")
    labels = {name: data["label"] for name, data in graph.nodes(data=True)}
    nx.draw_networkx_labels(graph, positions, labels, ax=axis, font_size=6)
    _legend(plt, axis, graph)
    axis.set_title(title)
    axis.axis("off")
    return figure


def _node_color(plt, data: dict):
    if data["kind"] == "site":
        return role_color(plt, data["role"])
    return {"attention": ATTENTION_COLOR, "input": INPUT_COLOR}.get(data["kind"], OP_COLOR)


def _legend(plt, axis, graph: nx.DiGraph) -> None:
    from matplotlib.patches import Patch

    roles = {d["role"] for _, d in graph.nodes(data=True) if d["kind"] == "site"}
    handles = [Patch(color=role_color(plt, role), label=role) for role in ROLE_ORDER if role in roles]
    handles += [Patch(color=ATTENTION_COLOR, label="attention"), Patch(color=OP_COLOR, label="other op"),
                Patch(facecolor=INPUT_COLOR, edgecolor="0.3", label="from outside the block")]
    axis.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
