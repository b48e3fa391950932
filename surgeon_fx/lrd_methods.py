"""Ways to factor a weight ``W`` (``m x n``) into ``U`` (``m x r``) and ``V`` (``r x n``).

- ``svd``: truncated SVD of ``W``; minimises ``||W - UV||_F``.
- ``svd-llm``: truncated SVD of ``W S`` where ``S S^T = X^T X / T + damp I`` is the
  Cholesky factor of the (damped) input covariance, then ``V = V' S^{-1}``. This
  minimises the output error ``||(W - UV) X^T||_F`` over the calibration inputs
  (Wang et al., "SVD-LLM", 2024). When the covariance is not positive definite
  even after damping, an eigendecomposition ``Q diag(l) Q^T`` with eigenvalues
  clamped above zero gives ``S = Q diag(sqrt(l))``.
- ``asvd``: truncated SVD of ``W diag(s)`` with ``s_j = mean|x_j| ** alpha``, then
  ``V = V' diag(s)^{-1}`` (Yuan et al., "ASVD", 2023).

Every method computes in float64 and returns factors in the weight's dtype.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .calibration import SiteStats

logger = logging.getLogger(__name__)

METHODS = ("svd", "svd-llm", "asvd")
CALIBRATED_METHODS = ("svd-llm", "asvd")
DAMPING = 1e-2  # fraction of the mean diagonal added to the covariance
ASVD_ALPHA = 0.5


def input_transform(method: str, stats: SiteStats | None, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return ``(S, S^{-1})`` for ``method``, or ``None`` for plain SVD.

    ``"auto"`` is ``"svd-llm"`` when ``stats`` are given and plain SVD otherwise.
    """
    if method == "auto":
        method = "svd-llm" if stats is not None else "svd"
    if method == "svd":
        return None
    if stats is None:
        raise ValueError(f"method {method!r} needs calibration statistics")
    if method == "svd-llm":
        return whitening(stats.covariance)
    if method == "asvd":
        scale = stats.mean_abs.clamp(min=1e-8) ** ASVD_ALPHA
        return torch.diag(scale), torch.diag(1.0 / scale)
    raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")


def whitening(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(S, S^{-1})`` with ``S S^T`` the damped covariance."""
    n = covariance.shape[0]
    damp = DAMPING * covariance.diagonal().mean().clamp(min=1e-12)
    damped = covariance + damp * torch.eye(n, dtype=covariance.dtype)
    factor, info = torch.linalg.cholesky_ex(damped)
    if int(info) == 0:
        inverse = torch.linalg.solve_triangular(factor, torch.eye(n, dtype=factor.dtype), upper=False)
        return factor, inverse
    logger.info("covariance not positive definite after damping; using an eigendecomposition")
    eigenvalues, eigenvectors = torch.linalg.eigh(damped)
    # Floor the spectrum above zero so that S stays invertible.
    floor = torch.maximum(damp, 1e-10 * eigenvalues.abs().max().clamp(min=1e-30))
    root = eigenvalues.clamp(min=floor).sqrt()
    return eigenvectors * root, (eigenvectors / root).T


def factor(weight: torch.Tensor, rank: int, transform: tuple[torch.Tensor, torch.Tensor] | None):
    """Return ``(U, V)``, ``U @ V`` the rank-``rank`` approximation of ``weight``."""
    w = weight.detach().to(torch.float64)
    if transform is not None:
        w = w @ transform[0].to(w.device)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    v = root[:, None] * vh[:rank]
    if transform is not None:
        v = v @ transform[1].to(w.device)
    return (u[:, :rank] * root).to(weight.dtype), v.to(weight.dtype)


def spectrum(weight: torch.Tensor, transform: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Return the singular values of ``weight`` in the metric of ``transform``."""
    w = weight.detach().to(torch.float64)
    if transform is not None:
        w = w @ transform[0].to(w.device)
    return torch.linalg.svdvals(w)
