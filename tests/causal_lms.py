"""Tiny causal language models built from configs, for the live-model, manager and checkpoint tests.

Each has 2 layers, hidden size 64, 4 query heads sharing 2 key/value heads
(head_dim 16) and an MLP of 128 neurons, so that every test runs in about a second.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

VOCAB = 100
LAYERS = 2

_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

CONFIGS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
}


def causal_lm(name: str, seed: int = 0, **overrides) -> nn.Module:
    """Return a seeded tiny causal LM in eval mode; ``overrides`` change config fields."""
    config_class, model_class = CONFIGS[name]
    torch.manual_seed(seed)
    return model_class(config_class(**{**_COMMON, **overrides})).eval()


def token_ids(batch: int = 2, seq: int = 8) -> torch.Tensor:
    """Return fixed token ids of shape ``(batch, seq)`` that avoid the special tokens."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (batch, seq), generator=generator)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def generate(model: nn.Module, ids: torch.Tensor, new_tokens: int = 4) -> torch.Tensor:
    """Return greedy continuations of ``ids``, ``new_tokens`` long."""
    mask = torch.ones_like(ids)
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return a copy of every tensor of ``model.state_dict()``."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_state_equal(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Assert that ``model`` has exactly the tensors of ``snapshot``, bit for bit."""
    state = model.state_dict()
    assert list(state) == list(snapshot)
    for name, tensor in snapshot.items():
        assert torch.equal(state[name], tensor), name
