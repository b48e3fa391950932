"""Small Hugging Face models described by a :class:`ModelSpec`, built without downloads.

A spec contains the family name and the few configuration fields that change the
graph (sizes, biases, activation, tied embeddings, attention implementation). Its
``repr`` is valid Python, so a failing spec printed by Hypothesis can be pasted
into an ``@example``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Prime sizes that no hidden, head or MLP size of a drawn spec equals, so that a
# vocabulary or position axis is never mistaken for the hidden axis.
VOCAB = 97
POSITIONS = 67

# family -> (config class, base model class, causal LM class or None)
_CLASSES = {
    "llama": ("LlamaConfig", "LlamaModel", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralModel", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2Model", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3Model", "Qwen3ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaModel", "GemmaForCausalLM"),
    "phi3": ("Phi3Config", "Phi3Model", "Phi3ForCausalLM"),
    "bert": ("BertConfig", "BertModel", None),
    "gpt2": ("GPT2Config", "GPT2Model", "GPT2LMHeadModel"),
}
FAMILIES = tuple(_CLASSES)
# Families whose config takes a head_dim that may differ from hidden_size // heads.
HEAD_DIM_FAMILIES = ("llama", "mistral", "qwen3", "gemma")
# Families whose config has bias switches, and the names of those switches.
BIAS_OPTIONS = {"llama": ("attention_bias", "mlp_bias"), "qwen3": ("attention_bias",), "gemma": ("attention_bias",)}
ACTIVATIONS = {
    "bert": ("gelu", "relu", "gelu_new", "silu"),
    "gpt2": ("gelu_new", "relu", "gelu", "silu"),
}
DECODER_ACTIVATIONS = ("silu", "gelu", "relu", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class ModelSpec:
    """A small model of one family: its size fields, switches and example input shape.

    ``options`` contains extra configuration fields of the family (biases, head_dim).
    ``lm_head`` selects the causal LM class (with an output head) over the base model.
    """

    family: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    num_layers: int = 1
    activation: str = "silu"
    tie_embeddings: bool = False
    lm_head: bool = False
    attn_implementation: str = "sdpa"
    options: dict[str, Any] = field(default_factory=dict)
    batch: int = 2
    seq_len: int = 5
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.options.get("head_dim", self.hidden_size // self.num_heads)

    def config(self):
        """Return the Hugging Face configuration object of this spec."""
        import transformers

        if self.family not in _CLASSES:
            raise ValueError(f"unknown family {self.family!r}; choose one of {list(FAMILIES)}")
        config_class = getattr(transformers, _CLASSES[self.family][0])
        return config_class(**self._config_fields())

    def _config_fields(self) -> dict[str, Any]:
        if self.family == "gpt2":
            return dict(
                n_embd=self.hidden_size, n_head=self.num_heads, n_layer=self.num_layers,
                n_inner=self.intermediate_size, activation_function=self.activation, vocab_size=VOCAB,
                n_positions=POSITIONS, bos_token_id=0, eos_token_id=0, tie_word_embeddings=self.tie_embeddings,
                attn_implementation=self.attn_implementation, **self.options,
            )
        fields = dict(
            hidden_size=self.hidden_size, num_attention_heads=self.num_heads, num_hidden_layers=self.num_layers,
            intermediate_size=self.intermediate_size, hidden_act=self.activation, vocab_size=VOCAB,
            max_position_embeddings=POSITIONS, attn_implementation=self.attn_implementation, **self.options,
        )
        if self.family == "bert":
            return fields
        fields.update(
            num_key_value_heads=self.num_kv_heads, tie_word_embeddings=self.tie_embeddings,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
        if self.family in HEAD_DIM_FAMILIES and "head_dim" not in fields:
            # Qwen3Config and GemmaConfig default head_dim to a constant (128, 256), not hidden // heads.
            fields["head_dim"] = self.head_dim
        return fields


def build_model(spec: ModelSpec) -> tuple[nn.Module, tuple, dict]:
    """Return ``(model, args, kwargs)``: a seeded model of ``spec`` in eval mode and token ids.

    The token ids have shape ``(spec.batch, spec.seq_len)`` and avoid the special
    tokens 0 to 2.
    """
    import transformers

    _, base_name, lm_name = _CLASSES[spec.family]
    class_name = lm_name if spec.lm_head and lm_name is not None else base_name
    torch.manual_seed(spec.seed)
    model = getattr(transformers, class_name)(spec.config()).eval()
    generator = torch.Generator().manual_seed(spec.seed + 1)
    ids = torch.randint(3, VOCAB, (spec.batch, spec.seq_len), generator=generator)
    return model, (ids,), {}
