"""Modules that replace linear layers: :class:`LinearLRD`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearLRD(nn.Module):
    """A linear layer with a rank-``r`` weight ``W ~= U @ V``.

    ``forward`` computes ``(x @ V.T) @ U.T + b`` for input ``(..., in_features)``,
    with ``v`` of shape ``(rank, in_features)`` and ``u`` of shape
    ``(out_features, rank)``. That costs ``rank * (in_features + out_features)``
    weights instead of ``in_features * out_features``.

    With ``rank=None`` (the ``"full"`` rank of a plan) the layer keeps the dense
    ``weight`` and its forward is ``F.linear(x, weight, bias)``, bit for bit the
    original layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int | None,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        factory = {"device": device, "dtype": dtype}
        if rank is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        else:
            self.v = nn.Parameter(torch.empty(rank, in_features, **factory))
            self.u = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None

    @property
    def full(self) -> bool:
        return self.rank is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank is None:
            return F.linear(x, self.weight, self.bias)
        return F.linear(F.linear(x, self.v), self.u, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int | str | None) -> LinearLRD:
        """Build from an ``nn.Linear`` (or GPT-2 ``Conv1D``) by truncated SVD of its weight."""
        weight = linear.weight
        if type(linear).__name__ == "Conv1D":
            weight = weight.t()  # Conv1D stores (in_features, out_features)
        return cls.from_weight(weight, linear.bias, rank)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, rank: int | str | None) -> LinearLRD:
        """Build from a weight of shape ``(out_features, in_features)`` and an optional bias.

        The SVD runs in float32 (float64 for float64 weights) on the weight's device,
        and the factors are cast back to the weight's dtype. Singular values are
        split evenly, ``U = U_r sqrt(S_r)`` and ``V = sqrt(S_r) V_r^T``, so both
        factors have the same scale for fine-tuning.
        """
        out_features, in_features = weight.shape
        rank = None if rank in (None, "full") else int(rank)
        if rank is not None and not 1 <= rank <= min(out_features, in_features):
            raise ValueError(
                f"rank must be in [1, {min(out_features, in_features)}] for a "
                f"{out_features}x{in_features} weight, got {rank}"
            )
        layer = cls(in_features, out_features, rank, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            if rank is None:
                layer.weight.copy_(weight)
            else:
                u, v = truncated_svd(weight, rank)
                layer.u.copy_(u)
                layer.v.copy_(v)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> LinearLRD:
        """Build from factors ``u`` (``out x rank``) and ``v`` (``rank x in``)."""
        layer = cls(v.shape[1], u.shape[0], u.shape[1], bias=bias is not None, device=u.device, dtype=u.dtype)
        with torch.no_grad():
            layer.u.copy_(u)
            layer.v.copy_(v)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def dense_weight(self) -> torch.Tensor:
        """Return the ``(out_features, in_features)`` weight this layer applies."""
        return self.weight if self.rank is None else self.u @ self.v

    def extra_repr(self) -> str:
        rank = "full" if self.rank is None else self.rank
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={rank}, bias={self.bias is not None}"


def truncated_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(U, V)`` with ``U @ V`` the best rank-``rank`` approximation of ``weight``."""
    compute_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    u, s, vh = torch.linalg.svd(weight.detach().to(compute_dtype), full_matrices=False)
    root = s[:rank].sqrt()
    # weight ~= (U_r * sqrt(S_r)) @ (sqrt(S_r)[:, None] * Vh_r)
    return (u[:, :rank] * root).to(weight.dtype), (root[:, None] * vh[:rank]).to(weight.dtype)


def lrd_num_params(in_features: int, out_features: int, rank: int | None, bias: bool) -> int:
    """Return the parameter count of a :class:`LinearLRD` of this shape."""
    weights = in_features * out_features if rank is None else rank * (in_features + out_features)
    return weights + (out_features if bias else 0)
