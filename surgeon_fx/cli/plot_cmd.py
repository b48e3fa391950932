"""``surgeon-fx plot MODEL --out DIR``: spectra, budget ranks and fidelity against size.

Writes three PNG files and the numbers behind them:

- ``spectra.png``: the singular values of every linear site's weight, divided by the
  largest, one panel per role, with a dot at the rank the plan chooses;
- ``ranks.png``: the rank chosen for every selected site next to its largest rank;
- ``fidelity.png``: the mean cosine similarity between the compressed and the
  original model's outputs on the example inputs, against the fraction of the
  model's parameters kept, for uniform ranks (``rank = {keep = f}``) and for a
  budget (``budget = {params = f}``) over the same sites;
- ``plot_data.json``: the values of all three plots.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from ..analysis import MLP_ROLES, Analysis, analyze
from ..api import compress, restore
from ..errors import PlanError
from ..live import capture_for_analysis
from ..lrd_methods import spectrum
from ..passes.manager import journal_of
from ..plan import Plan
from ..report import count_params
from . import progress
from .common import DEFAULT_BATCH_SIZE, MODEL_HELP, calibrate_plan_sites, check_calibration, fraction, positive_int
from .models import load_model
from .output import pyplot, role_color, save_figure, write_json

logger = logging.getLogger(__name__)

DEFAULT_BUDGET = 0.5
DEFAULT_POINTS = 6
COMPRESSED_ROLES = ("q", "k", "v", "qkv", "attn_out", *MLP_ROLES)


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "plot", parents=[common], help="plot singular value spectra, budget ranks and fidelity against size",
        description="Write spectra.png, ranks.png, fidelity.png and plot_data.json to DIR: the singular "
        "values of every linear site, the ranks PLAN chooses (without --plan: a parameter budget "
        "over every attention and MLP linear), and the output cosine similarity against the "
        "original model on the example inputs as the fraction of parameters kept varies.",
    )
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--out", metavar="DIR", type=Path, required=True, help="folder to write the plots to")
    parser.add_argument("--plan", metavar="PLAN", type=Path,
                        help="plan file (TOML or .json) whose LRD rules choose the ranks and the sites "
                        "of the fidelity curves; its own result is marked on the fidelity plot")
    parser.add_argument("--budget", metavar="F", type=fraction, default=DEFAULT_BUDGET,
                        help=f"without --plan: fraction of the selected weights to keep, in (0, 1] "
                        f"(default {DEFAULT_BUDGET})")
    parser.add_argument("--points", metavar="N", type=positive_int, default=DEFAULT_POINTS,
                        help=f"fractions of weights kept on each fidelity curve, evenly spaced from 0.1 "
                        f"to 1 (default {DEFAULT_POINTS})")
    parser.add_argument("--calib", metavar="TEXTFILE", type=Path,
                        help="UTF-8 text file, one sentence per line, for plans with calibrated methods")
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, metavar="N",
                        help=f"calibration sentences per batch (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--dpi", type=positive_int, default=120, metavar="N",
                        help="resolution of the PNG files in dots per inch (default 120)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    plan = Plan.from_file(args.plan) if args.plan is not None else None
    if plan is not None:
        check_calibration(plan, args.calib)
        if not plan.lrd:
            raise PlanError(f"plan {str(args.plan)!r} has no lrd rules; plot shows low-rank decomposition only")
    loaded = load_model(args.model)
    batches = loaded.tokenize_file(args.calib, args.batch_size) if args.calib is not None else None
    inputs = loaded.example_inputs()
    gm = capture_for_analysis(loaded.model, (), inputs, calibrated=batches is not None)
    analysis = analyze(gm)
    if plan is None:
        plan = default_plan(analysis, args.budget)
    stats = None
    if batches is not None:
        stats = calibrate_plan_sites(gm, analysis, plan, batches, loaded.model)
    ranks = {action.site.path: action.rank for action in plan.resolve_lrd(analysis, stats=stats)}

    spectra = site_spectra(analysis)
    fidelity = fidelity_curves(gm, analysis, plan, ranks, stats, inputs, args.points)
    data = {
        "model": loaded.name,
        "plan": plan.to_dict(),
        "sites": [
            {"path": s.path, "layer": s.layer, "role": s.role, "in_features": s.in_features,
             "out_features": s.out_features, "selected": s.path in ranks,
             "rank": _rank_entry(ranks, s.path),
             "singular_values": spectra[s.path].tolist()}
            for s in analysis.sites
        ],
        "fidelity": fidelity,
    }
    plt = pyplot()
    save_figure(plot_spectra(plt, analysis, spectra, ranks), args.out / "spectra.png", args.dpi)
    save_figure(plot_ranks(plt, analysis, ranks), args.out / "ranks.png", args.dpi)
    save_figure(plot_fidelity(plt, fidelity, loaded.name), args.out / "fidelity.png", args.dpi)
    write_json(args.out / "plot_data.json", data)
    for name in ("spectra.png", "ranks.png", "fidelity.png", "plot_data.json"):
        print(args.out / name)
    return 0


def _rank_entry(ranks: dict, path: str) -> int | str | None:
    """Return a site's rank for the JSON file: an int, ``"full"`` (left dense) or ``None`` (not selected)."""
    if path not in ranks:
        return None
    return "full" if ranks[path] is None else ranks[path]


def default_plan(analysis: Analysis, budget: float) -> Plan:
    """Return a plan with one budget rule over every attention and MLP linear of ``analysis``."""
    roles = sorted({s.role for s in analysis.sites if s.role in COMPRESSED_ROLES})
    if not roles:
        raise PlanError("the model has no attention or MLP linear sites; pass --plan with 'paths' selectors")
    return Plan.from_dict({"lrd": [{"roles": roles, "budget": {"params": budget}}]})


def site_spectra(analysis: Analysis) -> dict[str, torch.Tensor]:
    """Return the singular values of every site's weight (plain SVD), largest first."""
    spectra = {}
    with progress.bar(len(analysis.sites), "singular values", "site") as bar:
        for site in analysis.sites:
            spectra[site.path] = spectrum(site.weight(analysis.gm), None)
            bar.update()
    return spectra


# --- Fidelity against size ------------------------------------------------------------


def fidelity_curves(gm, analysis: Analysis, plan: Plan, ranks: dict, stats, inputs: dict, points: int) -> dict:
    """Compress ``gm`` at each fraction, measure the output cosine, and restore it each time."""
    paths = [s.path for s in analysis.sites if s.path in ranks]
    methods = {rule.method for rule in plan.lrd}
    method = methods.pop() if len(methods) == 1 else "svd"
    fractions = torch.linspace(0.1, 1.0, points).tolist() if points > 1 else [1.0]
    with torch.no_grad():
        reference = _main_tensor(gm(**inputs))
    total = count_params(gm)
    curves: dict[str, Any] = {"method": method, "uniform": [], "budget": []}
    with progress.bar(2 * len(fractions) + 1, "fidelity", "model") as bar:
        for fraction in fractions:
            for curve, rule in (("uniform", {"rank": {"keep": fraction}}), ("budget", {"budget": {"params": fraction}})):
                candidate = {"lrd": [{"paths": paths, "method": method, **rule}]}
                point = _measure(gm, candidate, stats, inputs, reference, total)
                if point is not None:
                    curves[curve].append({"fraction": round(fraction, 4), **point})
                bar.update()
        curves["plan"] = _measure(gm, plan, stats, inputs, reference, total)
        bar.update()
    return curves


def _measure(gm, plan, stats, inputs: dict, reference: torch.Tensor, total: int) -> dict | None:
    """Return the kept parameter fraction and output cosine of ``plan`` on ``gm``, or ``None`` if it does not apply."""
    try:
        compress(gm, plan, stats=stats)
    except PlanError as err:
        logger.info("skipped a fidelity point: %s", err)
        return None
    try:
        removed = _removed_params(journal_of(gm).rewrites)
        with torch.no_grad():
            output = _main_tensor(gm(**inputs))
    finally:
        restore(gm)
    cosine = _mean_cosine(reference, output, inputs.get("attention_mask"))
    return {"params_fraction": (total - removed) / total, "cosine": cosine}


def _removed_params(rows: list[dict[str, Any]]) -> int:
    """Return the parameters a compression removes; a site rewritten twice counts once."""
    before: dict[str, int] = {}
    after: dict[str, int] = {}
    for row in rows:
        before.setdefault(row["path"], row["params_before"])
        after[row["path"]] = row["params_after"]
    return sum(before[path] - after[path] for path in before)


def _main_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict):
        return _main_tensor(next(iter(output.values())))
    if isinstance(output, (tuple, list)):
        return _main_tensor(output[0])
    raise TypeError(f"no tensor in a model output of type {type(output).__name__}")


def _mean_cosine(reference: torch.Tensor, output: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Return the mean cosine similarity of the rows (tokens) of two outputs, padding left out."""
    reference = reference.reshape(-1, reference.shape[-1]).double()
    output = output.reshape(-1, output.shape[-1]).double()
    cosine = torch.nn.functional.cosine_similarity(reference, output, dim=-1)
    if mask is not None and mask.numel() == cosine.numel():
        cosine = cosine[mask.reshape(-1).bool()]
    return float(cosine.mean())


# --- Figures ---------------------------------------------------------------------------


def plot_spectra(plt, analysis: Analysis, spectra: dict, ranks: dict):
    roles = list(dict.fromkeys(s.role for s in analysis.sites))
    columns = min(3, len(roles))
    rows = -(-len(roles) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False)
    colormap = plt.get_cmap("viridis")
    layers = analysis.layers or [0]
    for axis, role in zip(axes.flat, roles):
        for site in analysis.sites_with_role(role):
            values = spectra[site.path]
            values = (values / values[0].clamp(min=1e-30)).numpy()
            shade = 0.5 if site.layer is None else layers.index(site.layer) / max(len(layers) - 1, 1)
            label = "-" if site.layer is None else f"layer {site.layer}"
            axis.semilogy(range(1, len(values) + 1), values, color=colormap(shade), linewidth=1, label=label)
            rank = ranks.get(site.path)
            if rank is not None:
                axis.plot(rank, values[rank - 1], "o", color=colormap(shade), markersize=4)
        axis.set_title(role)
        axis.set_xlabel("index")
        axis.set_ylabel("singular value / largest")
        axis.grid(True, which="both", alpha=0.3)
    for axis in list(axes.flat)[len(roles):]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    figure.suptitle("Singular values of each linear weight (dot: chosen rank)")
    figure.tight_layout()
    return figure


def plot_ranks(plt, analysis: Analysis, ranks: dict):
    sites = [s for s in analysis.sites if s.path in ranks]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.32 * len(sites) + 2), 4))
    positions = range(len(sites))
    largest = [min(s.in_features, s.out_features) for s in sites]
    break_even = [s.in_features * s.out_features // (s.in_features + s.out_features) for s in sites]
    chosen = [ranks[s.path] if ranks[s.path] is not None else lim for s, lim in zip(sites, largest)]
    colors = [role_color(plt, s.role) for s in sites]
    axis.bar(positions, largest, color="0.88", label="largest rank min(m, n)")
    bars = axis.bar(positions, chosen, color=colors, label="chosen rank")
    for bar, site in zip(bars, sites):
        if ranks[site.path] is None:
            bar.set_hatch("//")
    axis.plot(positions, break_even, "k_", markersize=10, label="rank at which factors cost as much as the weight")
    axis.set_xticks(list(positions))
    axis.set_xticklabels([f"{'-' if s.layer is None else s.layer} {s.role}" for s in sites], rotation=90, fontsize=7)
    axis.set_ylabel("rank")
    axis.set_title("Ranks chosen by the plan (hatched: left dense)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def plot_fidelity(plt, fidelity: dict, name: str):
    figure, axis = plt.subplots(figsize=(6, 4))
    for curve, style in (("uniform", "o-"), ("budget", "s-")):
        points = fidelity[curve]
        if points:
            axis.plot([p["params_fraction"] for p in points], [p["cosine"] for p in points], style,
                      label=f"{curve} ({fidelity['method']})")
    if fidelity.get("plan") is not None:
        point = fidelity["plan"]
        axis.plot(point["params_fraction"], point["cosine"], "r*", markersize=12, label="the plan")
    axis.set_xlabel("fraction of the model's parameters kept")
    axis.set_ylabel("mean output cosine vs the original")
    axis.set_title(f"Fidelity against size: {name}")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure
