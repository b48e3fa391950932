"""``decompose_linear``: replace linear nodes by :class:`~surgeon_fx.layers.LinearLRD`."""

from __future__ import annotations

import logging
from typing import Callable

from torch import fx

from ..analysis import LinearSite
from ..layers import LinearLRD, lrd_num_params
from ..lrd_methods import factor, input_transform
from ..plan import LRDAction
from .manager import PassResult, Rewriter
from .rewrite import replace_linear

logger = logging.getLogger(__name__)

Factorize = Callable[[fx.GraphModule, LinearSite, int], LinearLRD]


def _factorize_with(methods: dict[str, str], stats) -> Factorize:
    """Return a factoriser that uses each site's method and calibration statistics."""

    def factorize(gm: fx.GraphModule, site: LinearSite, rank: int) -> LinearLRD:
        method = methods.get(site.path, "svd")
        if method == "svd":
            return LinearLRD.from_weight(site.weight(gm), site.bias(gm), rank)
        transform = input_transform(method, stats.get(site.path), site.in_features)
        return LinearLRD.from_factors(*factor(site.weight(gm), rank, transform), site.bias(gm))

    return factorize


def decompose_linear(actions: list[LRDAction], factorize: Factorize | None = None, stats=None):
    """Return a pass that decomposes each action's site to its rank.

    Factors for all sites are computed first, and the graph is edited only after
    every factorisation succeeded. ``factorize(gm, site, rank)`` builds the
    replacement module; the default runs a truncated SVD of the site's weight, and
    the ``torch.compile`` backend passes one that caches factors per weight.
    """
    factorize = factorize or _factorize_with({a.site.path: a.method for a in actions}, stats or {})

    def run(gm: fx.GraphModule, rewriter: Rewriter) -> PassResult:
        todo = [a for a in actions if a.rank is not None]
        modules = []
        for action in todo:
            site = action.site
            modules.append(factorize(gm, site, action.rank))
            logger.debug("factorised %s to rank %d", site.path, action.rank)
        for action, module in zip(todo, modules):
            site = action.site
            replace_linear(gm, rewriter, site, module)
            rewriter.record(
                path=site.path,
                role=site.role,
                layer=site.layer,
                method=f"lrd:{action.method}",
                rank=action.rank,
                params_before=site.num_params,
                params_after=lrd_num_params(site.in_features, site.out_features, action.rank, site.has_bias),
            )
        return PassResult(gm, modified=bool(todo))

    return run
