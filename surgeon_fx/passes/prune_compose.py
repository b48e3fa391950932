"""Pruning followed by low-rank decomposition of the pruned sites, as one pass list.

Pruning runs first. Before anything changes, each decomposition rank is checked
against the pruned size of its site, and a ``{"keep": f}`` rank keeps that
fraction of the pruned layer. The decomposition then runs on the sites found
again in the pruned graph, by path.
"""

from __future__ import annotations

import dataclasses

from torch import fx

from ..analysis import Analysis, find_linear_sites
from ..errors import PlanError
from ..plan import LRDAction, Plan
from .decompose_linear import decompose_linear
from .manager import PassResult, Rewriter
from .prune_channels import prune_channels
from .prune_select import PruneSelection


def prune_passes(plan: Plan, analysis: Analysis, lrd_actions: list[LRDAction], *, hard: bool, stats=None) -> list:
    """Return ``[("prune_channels", ...), ("decompose_linear", ...)]`` for ``plan``.

    Raises:
        PlanError: a prune rule is invalid for the model, or a decomposition rank
            does not fit the pruned size of its site.
    """
    if getattr(plan, "sequential", False):
        raise PlanError("a sequential plan cannot prune; run the prune rules in a separate compress() call")
    selection = plan.resolve_prune(analysis, stats)
    stats = _pruned_stats(selection, stats)
    lrd_actions = _resolve_after_prune(plan, analysis, selection, lrd_actions, stats)
    passes = [("prune_channels", prune_channels(selection, hard=hard))]
    if any(a.rank is not None for a in lrd_actions):
        passes.append(("decompose_linear", _decompose_pruned(lrd_actions, stats)))
    return passes


def _pruned_stats(selection: PruneSelection, stats):
    """Restrict each site's input statistics to the input channels that pruning keeps.

    NOTE: exact for pruned MLP neurons and heads, whose kept inputs do not change.
    Hidden-size pruning also changes the values of the kept channels (norms see
    fewer channels), so there the restricted statistics are an approximation.
    """
    if not stats or not selection:
        return stats
    restricted = dict(stats)
    for (path, axis), kept in selection.site_indices.items():
        if axis == "in" and path in restricted:
            restricted[path] = restricted[path].restrict(kept)
    return restricted


def _resolve_after_prune(plan, analysis, selection: PruneSelection, actions, stats) -> list[LRDAction]:
    if not plan.lrd or not selection:
        return actions
    pruned_sites = []
    for site in analysis.sites:
        if site.path in selection.sites:
            out, into = selection.site_shape(site)
            site = dataclasses.replace(site, out_features=out, in_features=into)
        pruned_sites.append(site)
    pruned = Analysis(gm=analysis.gm, sites=pruned_sites, attention=analysis.attention)
    return plan.resolve_lrd(pruned, stats=stats)


def _decompose_pruned(actions: list[LRDAction], stats):
    """Return a pass that decomposes the planned sites as found in the pruned graph."""

    def run(gm: fx.GraphModule, rewriter: Rewriter) -> PassResult:
        current = {site.path: site for site in find_linear_sites(gm)}
        fresh = []
        for action in actions:
            site = current.get(action.site.path)
            if site is None:
                raise ValueError(f"site {action.site.path} is missing from the pruned graph")
            site.role, site.layer, site.block = action.site.role, action.site.layer, action.site.block
            fresh.append(dataclasses.replace(action, site=site))
        return decompose_linear(fresh, stats=stats)(gm, rewriter)

    return run
