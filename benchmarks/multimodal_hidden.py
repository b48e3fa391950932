"""Hidden-size pruning of a mid-size Qwen2.5-VL through the manager: cost and agreement.

The model is built from a config (vision: 4 blocks of width 256; language model:
4 layers of width 512 with grouped-query attention) and runs one image of 16 x 16
patches with 98 tokens of text. The plan of the original quick start prunes heads
and MLP neurons per tower and 10% of each tower's hidden size. Reported:

- the time of capture and analysis, of joining each tower's residual stream
  across the blockwise parts (one eager run plus small exports), and of soft
  and hard compression, each as a fraction of the capture time;
- whether restore is bit-exact, and the largest difference between the hard and
  soft logits;
- the parameter count before and after, and the new hidden sizes.

Run: ``.venv/bin/python benchmarks/multimodal_hidden.py`` (about 10 s on 2 cores).
"""

from __future__ import annotations

import time
import warnings

import torch
import transformers

import surgeon_fx
from common import machine, write_json
from surgeon_fx import CompressionConfig, CompressionSchemesManager
from surgeon_fx.live import join_hidden_groups

IMAGE, VIDEO, VISION_START, VISION_END = 90, 91, 92, 93
CONFIG = CompressionConfig(
    pruning_ratio_lists={
        "vision": {"sa_qkv": [0.25] * 4, "mlp_up": [0.25] * 4},
        "text": {"sa_qkv": [0.5] * 4, "mlp_up": [0.25] * 4},
    },
    pruning_ratio_skip_connections=0.1,
)


def build() -> tuple[torch.nn.Module, dict]:
    config = transformers.Qwen2_5_VLConfig(
        vision_config=dict(
            depth=4, hidden_size=256, intermediate_size=512, num_heads=8, out_hidden_size=512, patch_size=14,
            temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[3],
        ),
        text_config=dict(
            vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 10000.0},
        ),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    grid = (1, 16, 16)
    patches = grid[0] * grid[1] * grid[2]
    pixels = torch.randn(patches, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[5, 6, VISION_START] + [IMAGE] * (patches // 4) + [VISION_END] + list(range(10, 40))])
    inputs = {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == IMAGE).long(),
        "pixel_values": pixels, "image_grid_thw": torch.tensor([grid]),
    }
    return model, inputs


def logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(2)
    model, inputs = build()
    dense = logits(model, inputs)
    params_before = sum(p.numel() for p in model.parameters())

    start = time.perf_counter()
    analysis = surgeon_fx.analyze(surgeon_fx.capture(model, (), inputs))
    capture_s = time.perf_counter() - start
    join_s = timed(lambda: join_hidden_groups(model, analysis, CONFIG.to_plan(analysis), (), inputs))

    manager = CompressionSchemesManager(model, CONFIG, (), inputs)
    soft_s = timed(lambda: manager.apply_all(hard=False))
    soft = logits(model, inputs)
    restore_s = timed(manager.restore_all)
    restored_exact = torch.equal(logits(model, inputs), dense)
    manager.apply_all(hard=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", surgeon_fx.SurgeonWarning)  # per-layer head counts
        hard_s = timed(lambda: manager.apply_all(hard=True))
    hard = logits(model, inputs)

    result = {
        "machine": machine(),
        "tokens": inputs["input_ids"].shape[1],
        "patches": inputs["pixel_values"].shape[0],
        "seconds": {"capture_and_analysis": capture_s, "join": join_s, "soft": soft_s, "restore": restore_s,
                    "hard": hard_s},
        "fraction_of_capture": {"join": join_s / capture_s, "soft": soft_s / capture_s, "hard": hard_s / capture_s},
        "restore_bit_exact": restored_exact,
        "max_abs_hard_minus_soft": float((hard - soft).abs().max()),
        "params": {"before": params_before, "after": sum(p.numel() for p in model.parameters())},
        "hidden_sizes": {"vision": model.config.vision_config.hidden_size,
                         "text": model.config.text_config.hidden_size},
    }
    path = write_json("multimodal_hidden.json", result)
    seconds = result["seconds"]
    print(f"{result['tokens']} tokens, {result['patches']} patches")
    print("capture + analysis {capture_and_analysis:.2f} s, join {join:.2f} s, soft {soft:.2f} s, "
          "restore {restore:.3f} s, hard {hard:.2f} s".format(**seconds))
    print("join / capture {join:.2f}, soft / capture {soft:.2f}, hard / capture {hard:.2f}".format(
        **result["fraction_of_capture"]))
    print(f"restore bit-exact: {restored_exact}; max |hard - soft| = {result['max_abs_hard_minus_soft']:.2e}")
    print(f"parameters {params_before:,} -> {result['params']['after']:,}; hidden sizes {result['hidden_sizes']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
