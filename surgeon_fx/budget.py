"""Rank allocation under a global budget.

Given sites ``i`` with weights ``m_i x n_i`` and singular values ``s_ij`` (in the
metric of the chosen method: whitened for ``svd-llm``), pick ranks ``r_i`` that
minimise the summed relative truncation error
``sum_i sum_{j > r_i} s_ij^2 / sum_j s_ij^2`` subject to
``sum_i cost_i(r_i) <= fraction * sum_i m_i n_i``, where ``cost_i(r) = r (m_i + n_i)``.

The error is relative to each site's energy so that sites with large inputs do not
take the whole budget. On all-MiniLM-L6-v2 (``benchmarks/fidelity.py``) it keeps
more fidelity than absolute errors at 80% of the weights, but less than uniform
ranks at 60%.

Each extra rank of site ``i`` removes ``s_ij^2`` error for ``m_i + n_i`` weights, and
these gains decrease with ``j``, so taking steps greedily in order of
``s_ij^2 / (m_i + n_i)`` until the budget is spent is optimal up to the last step.
A site whose rank reaches ``floor(m n / (m + n))`` costs as much factored as dense,
so beyond that it stays dense (rank ``None``) at cost ``m n``.

Per token, a linear layer's multiply-adds equal its weight count, so a ``flops``
budget allocates the same way as a ``params`` budget. Biases are left out of both.
"""

from __future__ import annotations

import heapq

import torch

from .analysis import LinearSite
from .errors import PlanError


def allocate_ranks(
    sites: list[LinearSite], spectra: list[torch.Tensor], fraction: float, where: str
) -> dict[LinearSite, int | None]:
    """Return the rank of each site (``None``: keep dense) within ``fraction`` of the weights."""
    total = sum(s.in_features * s.out_features for s in sites)
    budget = fraction * total
    ranks = {site: 0 for site in sites}
    spent = 0.0
    spectra = [values / values.norm().clamp(min=1e-30) for values in spectra]
    # Every site needs rank 1, so those steps are paid first: in gain order alone,
    # sites with large gains could spend the budget and leave another at rank 0.
    heap = []
    for index, (site, values) in enumerate(zip(sites, spectra)):
        first = _next_step(site, values, 0, index)
        if first is None:
            continue
        ranks[site] = first[3]
        spent += first[1]
        step = _next_step(site, values, first[3], index)
        if step is not None:
            heap.append(step)
    if spent > budget:
        raise PlanError(
            f"{where}: a budget of {fraction} cannot pay for rank 1 on each of the {len(sites)} selected "
            f"sites, which needs {spent / total:.4g} of their weights; raise the budget or select fewer sites"
        )
    heapq.heapify(heap)
    while heap:
        _, cost, index, rank = heapq.heappop(heap)
        if spent + cost > budget:
            continue  # this site's next step does not fit; smaller steps may still
        site = sites[index]
        ranks[site] = rank
        spent += cost
        step = _next_step(site, spectra[index], rank, index)
        if step is not None:
            heapq.heappush(heap, step)
    result: dict[LinearSite, int | None] = {}
    # A site whose rank reached its dense rank is left dense (rank None).
    for site, rank in ranks.items():
        if rank == 0:
            raise PlanError(
                f"{where}: a budget of {fraction} leaves no rank for {site.path} "
                f"({site.out_features}x{site.in_features}); raise the budget or select fewer sites"
            )
        dense_rank = site.in_features * site.out_features // (site.in_features + site.out_features)
        result[site] = None if rank >= dense_rank else rank
    return result


def _next_step(site: LinearSite, values: torch.Tensor, rank: int, index: int) -> tuple | None:
    """Return the heap entry ``(-gain / cost, cost, index, new_rank)`` of one more rank.

    The step that reaches the dense rank costs the rest of ``m n`` and removes all the
    remaining error, because the site is then kept dense.
    """
    width = site.in_features + site.out_features
    dense_rank = site.in_features * site.out_features // width
    limit = min(len(values), dense_rank)
    if rank >= limit:
        return None
    if rank + 1 == dense_rank:
        cost = site.in_features * site.out_features - rank * width
        gain = float((values[rank:] ** 2).sum())
    else:
        cost = width
        gain = float(values[rank] ** 2)
    return (-gain / cost, cost, index, rank + 1)
