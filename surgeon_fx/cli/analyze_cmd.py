"""``surgeon-fx analyze MODEL``: linear sites, roles, head geometry and coupling groups."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from ..analysis import Analysis, analyze
from ..live import capture_for_analysis
from ..report import count_params
from .common import MODEL_HELP
from .models import LoadedModel, load_model
from .output import write_json

logger = logging.getLogger(__name__)


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "analyze", parents=[common], help="print the linear sites, roles, heads and coupling groups",
        description="Capture MODEL on example inputs and print its analysis: every linear site with "
        "its layer, role and size, the head geometry of every attention operation, and the "
        "coupling groups that structured pruning keeps together.",
    )
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--json", metavar="FILE", type=Path,
                        help="also write the analysis to FILE as JSON (sites, attention operations, groups)")
    parser.add_argument("--slots", action="store_true",
                        help="list every tensor axis (slot) of each coupling group, not only the counts")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    loaded = load_model(args.model)
    analysis = capture_and_analyze(loaded)
    print(f"{loaded.name}: {type(loaded.model).__name__}, {count_params(loaded.model):,} parameters, "
          f"{len(analysis.layers)} layers, {len(analysis.sites)} linear sites, "
          f"{len(analysis.attention)} attention operations\n")
    print(analysis.table())
    print()
    print(format_groups(analysis, slots=args.slots))
    if args.json is not None:
        write_json(args.json, analysis_to_dict(loaded, analysis))
        logger.info("wrote %s", args.json)
    return 0


def capture_and_analyze(loaded: LoadedModel) -> Analysis:
    """Capture the model on its example inputs (static shapes) and analyse the graph module."""
    start = time.perf_counter()
    gm = capture_for_analysis(loaded.model, (), loaded.example_inputs(), calibrated=False)
    analysis = analyze(gm)
    logger.info("captured and analysed %s in %.1f s", loaded.name, time.perf_counter() - start)
    return analysis


def format_groups(analysis: Analysis, slots: bool = False) -> str:
    """Return the coupling groups as a plain-text table, with their slots when ``slots``."""
    header = f"{'layer':>5}  {'unit':<12} {'size':>6} {'kv':>4} {'head_dim':>8} {'sites':>5} {'slots':>5}  prunable"
    lines = [header, "-" * len(header)]
    for group in analysis.groups:
        layer = "-" if group.layer is None else str(group.layer)
        kv = "-" if group.num_kv_heads is None else str(group.num_kv_heads)
        head_dim = "-" if group.head_dim is None else str(group.head_dim)
        prunable = "yes" if group.unsupported is None else f"no: {group.unsupported}"
        lines.append(f"{layer:>5}  {group.unit:<12} {group.size:>6} {kv:>4} {head_dim:>8} "
                     f"{len(group.sites):>5} {len(group.slots):>5}  {prunable}")
        if slots:
            lines.extend(f"{'':>7}{slot}" for slot in group.slots)
    return "\n".join(lines)


def analysis_to_dict(loaded: LoadedModel, analysis: Analysis) -> dict[str, Any]:
    sites = [
        {"path": s.path, "layer": s.layer, "role": s.role, "in_features": s.in_features,
         "out_features": s.out_features, "bias": s.has_bias, "params": s.num_params}
        for s in analysis.sites
    ]
    attention = [
        {"layer": op.layer, "kind": op.kind, "num_heads": op.num_heads, "num_kv_heads": op.num_kv_heads,
         "head_dim": op.head_dim, "rotary": op.rotary, "sites": [s.path for s in op.sites]}
        for op in analysis.attention
    ]
    groups = [
        {"unit": g.unit, "layer": g.layer, "size": g.size, "num_kv_heads": g.num_kv_heads,
         "head_dim": g.head_dim, "sites": [s.path for s in g.sites], "slots": [str(slot) for slot in g.slots],
         "unsupported": g.unsupported}
        for g in analysis.groups
    ]
    return {"model": loaded.name, "class": type(loaded.model).__name__, "params": count_params(loaded.model),
            "layers": analysis.layers, "sites": sites, "attention": attention, "groups": groups}
