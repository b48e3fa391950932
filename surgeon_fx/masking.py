"""Modules that soft pruning inserts around pruned tensors: gather and scatter of channels.

Soft pruning stores every pruned weight in its compact (hard-pruned) shape, so a
removed weight does not exist and fine-tuning cannot bring it back. To let the
rest of the graph keep its original sizes, :class:`ChannelGather` picks the kept
channels of a full-size tensor before a compact operation, and
:class:`ChannelScatter` puts a compact result back at the kept positions of a
zero tensor. The compact operations compute exactly what the hard-pruned graph
computes; the scattered zeros stand for the removed channels.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelGather(nn.Module):
    """``x.index_select(dim, index)``: keep the channels listed in ``index``."""

    def __init__(self, index: list[int], dim: int = -1) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("index", torch.tensor(index, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(self.dim, self.index.to(x.device))

    def extra_repr(self) -> str:
        return f"kept={self.index.numel()}, dim={self.dim}"


class ChannelScatter(nn.Module):
    """Place ``x`` at channels ``index`` of a zero tensor with ``size`` channels on ``dim``."""

    def __init__(self, index: list[int], size: int, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim
        self.size = size
        self.register_buffer("index", torch.tensor(index, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = list(x.shape)
        shape[self.dim] = self.size
        # out[..., index[j], ...] = x[..., j, ...]; every other channel stays zero.
        return x.new_zeros(shape).index_copy(self.dim, self.index.to(x.device), x)

    def extra_repr(self) -> str:
        return f"kept={self.index.numel()}, size={self.size}, dim={self.dim}"
