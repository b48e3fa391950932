"""``decompose_linear``: replace linear nodes by :class:`~surgeon_fx.layers.LinearLRD`."""

from __future__ import annotations

import logging

from torch import fx

from ..layers import LinearLRD, lrd_num_params
from ..plan import LRDAction
from .manager import PassResult, Rewriter
from .rewrite import replace_linear

logger = logging.getLogger(__name__)


def decompose_linear(actions: list[LRDAction]):
    """Return a pass that decomposes each action's site to its rank.

    Factors for all sites are computed first, and the graph is edited only after
    every factorisation succeeded.
    """

    def run(gm: fx.GraphModule, rewriter: Rewriter) -> PassResult:
        todo = [a for a in actions if a.rank is not None]
        modules = []
        for action in todo:
            site = action.site
            modules.append(LinearLRD.from_weight(site.weight(gm), site.bias(gm), action.rank))
            logger.debug("factorised %s to rank %d", site.path, action.rank)
        for action, module in zip(todo, modules):
            site = action.site
            replace_linear(gm, rewriter, site, module)
            rewriter.record(
                path=site.path,
                role=site.role,
                layer=site.layer,
                method="lrd",
                rank=action.rank,
                params_before=site.num_params,
                params_after=lrd_num_params(site.in_features, site.out_features, action.rank, site.has_bias),
            )
        return PassResult(gm, modified=bool(todo))

    return run
