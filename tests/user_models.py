"""Small hand-written models for the capture and analysis tests.

Unlike the Hugging Face cases in ``models.py``, these are plain ``nn.Module``
code of the kind a user writes, plus models that capture must reject.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

USER_VOCAB = 50
USER_HIDDEN = 32
USER_HEADS = 4
USER_HEAD_DIM = USER_HIDDEN // USER_HEADS
USER_LAYERS = 2


class UserAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections.

    ``kind="sdpa"`` calls ``F.scaled_dot_product_attention``. ``kind="matmul"``
    spells it out as matmul, softmax, matmul, with the softmax and dropout as
    ``nn.Softmax`` and ``nn.Dropout`` submodules.
    """

    def __init__(self, hidden: int, heads: int, kind: str) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.kind = kind
        self.softmax = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(0.1)
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        # (B, T, H) -> (B, heads, T, head_dim)
        q = self.query(x).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k = self.key(x).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        v = self.value(x).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        if self.kind == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            y = torch.matmul(self.dropout(self.softmax(scores)), v)
        return self.out(y.transpose(1, 2).reshape(batch, seq, hidden))


class UserBlock(nn.Module):
    """Pre-norm transformer block: attention and a GELU MLP, each with a residual.

    With ``kind="sdpa"`` the MLP calls ``F.gelu`` between ``fc_in`` and ``fc_out``.
    With ``kind="matmul"`` it is ``nn.Sequential(Linear, GELU, Dropout, Linear)``.
    """

    def __init__(self, hidden: int, heads: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = UserAttention(hidden, heads, kind)
        self.norm2 = nn.LayerNorm(hidden)
        if kind == "sdpa":
            self.fc_in = nn.Linear(hidden, 4 * hidden)
            self.fc_out = nn.Linear(4 * hidden, hidden)
        else:
            self.mlp = nn.Sequential(
                nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * hidden, hidden)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        if self.kind == "sdpa":
            return x + self.fc_out(F.gelu(self.fc_in(self.norm2(x))))
        return x + self.mlp(self.norm2(x))


class UserTransformer(nn.Module):
    """Token embedding, ``USER_LAYERS`` blocks, a final LayerNorm and a vocabulary head."""

    def __init__(self, kind: str = "sdpa") -> None:
        super().__init__()
        self.embed = nn.Embedding(USER_VOCAB, USER_HIDDEN)
        self.blocks = nn.ModuleList(UserBlock(USER_HIDDEN, USER_HEADS, kind) for _ in range(USER_LAYERS))
        self.norm = nn.LayerNorm(USER_HIDDEN)
        self.head = nn.Linear(USER_HIDDEN, USER_VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def user_transformer(kind: str = "sdpa") -> tuple[nn.Module, torch.Tensor]:
    """Return a seeded ``UserTransformer`` in eval mode and example token ids of shape (2, 8)."""
    torch.manual_seed(0)
    model = UserTransformer(kind).eval()
    ids = torch.randint(0, USER_VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    return model, ids


class DataDependentBranch(nn.Module):
    """Branches on a tensor's value, which neither export nor symbolic tracing can capture."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.linear(x)
        return -self.linear(x)


class ForwardRaises(nn.Module):
    """A model whose forward always fails."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("weights not loaded")


class MLPOnly(nn.Module):
    """Two MLP blocks and no attention."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.down(F.gelu(self.up(x))))
