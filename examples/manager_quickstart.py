"""Quick start for transformer-surgeon users: per-layer lists, a manager, apply and restore.

Builds a tiny Llama causal LM from a config (no download), compresses it with a
CompressionConfig through CompressionSchemesManager, prints the schemes, generates
text tokens, makes the compression permanent, and saves and reloads it.

Run: python examples/manager_quickstart.py [output directory]
"""

from __future__ import annotations

import sys
import tempfile
import warnings

import torch
import transformers

import surgeon_fx
from surgeon_fx import CompressionConfig, CompressionSchemesManager

LAYERS = 4
VOCAB = 256


def build_model() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def greedy(model, ids: torch.Tensor) -> list[int]:
    with torch.no_grad():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                min_new_tokens=8, do_sample=False)
    return output[0, ids.shape[1]:].tolist()


def main(directory: str) -> None:
    model = build_model()
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    print("dense parameters:", sum(p.numel() for p in model.parameters()))
    print("dense continuation:", greedy(model, ids))

    # One value per decoder layer. "full" keeps a layer's rank; a ratio of 0 prunes nothing.
    config = CompressionConfig(
        pruning_ratio_lists={
            "sa_qkv": [0.0, 0.25, 0.25, 0.5],  # fraction of attention heads removed
            "mlp_up": [0.25, 0.25, 0.5, 0.5],  # fraction of MLP neurons removed (up and gate)
        },
        lrd_rank_lists={
            "sa_qkv": ["full", "full", 8, 8],
            "sa_out": [24, 24, 16, 16],
            "mlp_up": [32, 32, 24, 24],
            "mlp_down": [32, 32, 24, 24],
        },
        pruning_ratio_skip_connections=0.1,  # fraction of the hidden size removed
    )
    manager = CompressionSchemesManager(model, config, (ids,))
    manager.apply_all(hard=False)
    print(manager)
    print("soft continuation:", greedy(model, ids))

    with warnings.catch_warnings():
        # The head and neuron counts differ per layer, which model.config cannot hold.
        warnings.simplefilter("ignore", surgeon_fx.SurgeonWarning)
        manager.apply_all(hard=True)
    print("hard parameters:", sum(p.numel() for p in model.parameters()))
    print("hard continuation:", greedy(model, ids))

    surgeon_fx.save(model, directory)
    reloaded = surgeon_fx.load(directory, build_model())
    print("reloaded continuation:", greedy(reloaded, ids))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as temporary:
            main(temporary)
