"""Quick start for transformer-surgeon users on a multimodal model: a tiny Qwen2.5-VL.

Builds Qwen2.5-VL from a config (no download), with a vision tower of 2 blocks and
a language model of 2 layers. It compresses both towers with per-layer lists nested
under the tower names "vision" and "text", through CompressionSchemesManager, prints
the schemes, generates from an image, and restores the original model.

Qwen2.5-VL does not export as one graph, so surgeon_fx records the inputs of each
block during one run on the example image, exports every block alone and
analyses those graphs (run with logging at INFO level to see why). The residual
stream between the blocks is followed through the same run.

Run: python examples/qwen2_5_vl_quickstart.py
"""

from __future__ import annotations

import torch
import transformers

from surgeon_fx import CompressionConfig, CompressionSchemesManager

IMAGE, VISION_START, VISION_END = 90, 92, 93


def build_model() -> transformers.Qwen2_5_VLForConditionalGeneration:
    config = transformers.Qwen2_5_VLConfig(
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=4,
            temporal_patch_size=2, spatial_merge_size=2, window_size=16, fullatt_block_indexes=[1],
        ),
        text_config=dict(
            vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        ),
        image_token_id=IMAGE, video_token_id=91, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )
    torch.manual_seed(0)
    return transformers.Qwen2_5_VLForConditionalGeneration(config).eval()


def image_inputs() -> dict[str, torch.Tensor]:
    """Return one image of 4 x 4 patches of 4 x 4 pixels, and a prompt with its 4 merged image tokens."""
    grid = torch.tensor([[1, 4, 4]])  # (temporal, height, width) patches
    pixels = torch.randn(16, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(2))  # (patches, c*t*p*p)
    ids = torch.tensor([[5, 6, VISION_START] + [IMAGE] * 4 + [VISION_END, 7, 8, 9]])
    token_types = (ids == IMAGE).long()  # 1 marks image tokens for the multimodal rotary positions
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": token_types,
            "pixel_values": pixels, "image_grid_thw": grid}


def greedy(model, inputs: dict[str, torch.Tensor]) -> list[int]:
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def main() -> None:
    model = build_model()
    inputs = image_inputs()
    with torch.no_grad():
        dense_logits = model(**inputs).logits
    print("dense continuation:", greedy(model, inputs))

    # One value per block of each tower. "full" keeps a layer's rank, and a ratio of 0 prunes nothing.
    config = CompressionConfig(
        pruning_ratio_lists={
            "vision": {"sa_qkv": [0.25, 0.5], "mlp_up": [0.25, 0.25]},  # heads, neurons (up and gate)
            "text": {"sa_qkv": [0.0, 0.5], "mlp_up": [0.25, 0.5]},
        },
        lrd_rank_lists={
            "vision": {"sa_out": ["full", 8], "mlp_down": [16, 16]},
            "text": {"sa_out": [16, "full"], "mlp_down": [32, 24]},
        },
        # Remove 10% of the hidden size of each tower: the residual stream, with the
        # embeddings, norms, patch merger and output head that read or write it.
        pruning_ratio_skip_connections=0.1,
    )
    manager = CompressionSchemesManager(model, config, (), inputs)
    manager.apply_all(hard=False)
    print(manager)
    print("soft continuation:", greedy(model, inputs))

    manager.restore_all()
    with torch.no_grad():
        restored_logits = model(**inputs).logits
    print("restored equals dense:", torch.equal(restored_logits, dense_logits))


if __name__ == "__main__":
    main()
