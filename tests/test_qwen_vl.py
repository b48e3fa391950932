"""Qwen2.5-VL and Qwen2-VL: blockwise capture, the analysis of both towers, per-tower compression.

Neither model exports whole with transformers 5 (the vision tower computes its
attention chunks from the image grid's values), so every capture here is
blockwise. Each case is a tiny model built from a config. Its vision tower has 2
blocks (hidden 32, 4 heads of 8, fused qkv). Its language model has 2 layers
(hidden 64, 4 query heads sharing 2 key/value heads of 16, multimodal rotary
sections [2, 3, 3]). The image is 4 x 4 patches, merged 2 x 2 into 4 image tokens.
The video has 2 temporal patches of 4 x 4, which gives the vision attention one
chunk per frame.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from causal_lms import assert_state_equal, causal_lm, state_snapshot, token_ids
from torch import nn

import surgeon_fx
from surgeon_fx import CaptureError, CompressionConfig, CompressionSchemesManager, PlanError, SurgeonWarning
from surgeon_fx.analysis.towers import tower_names
from surgeon_fx.blockwise import BLOCKWISE_META, find_stacks, is_blockwise
from surgeon_fx.live import apply_plan, join_hidden_groups, journal_of_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

IMAGE, VIDEO, VISION_START, VISION_END = 90, 91, 92, 93
KINDS = ["qwen2_5_vl", "qwen2_vl"]
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "qwen2_5_vl_quickstart.py"
TEXT = dict(
    vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
)
VISION = {
    "qwen2_5_vl": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                       window_size=16, fullatt_block_indexes=[1]),
    "qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4),
}
CLASSES = {
    "qwen2_5_vl": (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration),
    "qwen2_vl": (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration),
}
# One value per block; the vision tower prunes half of the heads of block 0.
PER_TOWER = CompressionConfig(
    pruning_ratio_lists={
        "vision": {"sa_qkv": [0.5, 0.0], "mlp_up": [0.25, 0.5]},
        "text": {"sa_qkv": [0.5, 0.0], "mlp_up": [0.25, 0.25]},
    },
    lrd_rank_lists={
        "vision": {"sa_out": [4, "full"], "mlp_down": [8, 8]},
        "text": {"sa_out": [8, 8], "mlp_down": ["full", 16]},
    },
)


def build(kind: str, seed: int = 0) -> nn.Module:
    config_class, model_class = CLASSES[kind]
    vision = dict(VISION[kind], patch_size=4, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
    config = config_class(
        vision_config=vision, text_config=dict(TEXT), image_token_id=IMAGE, video_token_id=VIDEO,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )
    torch.manual_seed(seed)
    return model_class(config).eval()


def visual_inputs(model: nn.Module, kind: str = "image", grid: tuple[int, int, int] = (1, 4, 4)) -> dict:
    """Return model inputs with one image (or video) of ``grid`` = (t, h, w) patches between text tokens.

    ``pixel_values`` has one row per patch: channels * temporal_patch * patch * patch
    values. The text contains one image token per merged patch (spatial_merge_size**2
    patches each), between the vision start and end tokens.
    """
    vision = model.config.vision_config
    t, h, w = grid
    patch_values = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    pixels = torch.randn(t * h * w, patch_values, generator=torch.Generator().manual_seed(2))
    token = IMAGE if kind == "image" else VIDEO
    ids = torch.tensor([[5, 6, VISION_START] + [token] * (t * h * w // vision.spatial_merge_size ** 2)
                        + [VISION_END, 7, 8, 9]])
    # 0 for text, 1 for image and 2 for video tokens: the multimodal rotary positions need it.
    token_types = (ids == IMAGE).long() + 2 * (ids == VIDEO).long()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": token_types}
    if kind == "image":
        return {**inputs, "pixel_values": pixels, "image_grid_thw": torch.tensor([grid])}
    return {**inputs, "pixel_values_videos": pixels, "video_grid_thw": torch.tensor([grid])}


def logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def analyses():
    """Capture and analyse each model once per input kind: ``(kind, "image" | "video") -> Analysis``."""
    cache = {}

    def get(kind: str, media: str = "image"):
        if (kind, media) not in cache:
            model = build(kind)
            grid = (1, 4, 4) if media == "image" else (2, 4, 4)
            gm = surgeon_fx.capture(model, (), visual_inputs(model, media, grid))
            cache[kind, media] = surgeon_fx.analyze(gm)
        return cache[kind, media]

    return get


# --- Capture -------------------------------------------------------------------------


def test_find_stacks_names_both_towers():
    assert find_stacks(build("qwen2_5_vl")) == ["model.visual.blocks", "model.language_model.layers"]


@pytest.mark.parametrize("kind", KINDS)
def test_capture_falls_back_to_blockwise(kind, caplog):
    model = build(kind)
    with caplog.at_level(logging.INFO, logger="surgeon_fx"):
        gm = surgeon_fx.capture(model, (), visual_inputs(model))
    assert is_blockwise(gm)
    capture = gm.meta[BLOCKWISE_META]
    assert capture.stacks == ["model.visual.blocks", "model.language_model.layers"]
    assert [p.path for p in capture.parts if p.stack is None] == ["model.visual.merger", "lm_head"]
    assert capture.skipped == {}
    assert "whole-model torch.export failed" in capture.reason
    assert "blockwise" in caplog.text
    assert "because whole-model torch.export failed" in caplog.text


def test_capture_whole_strategy_raises():
    model = build("qwen2_5_vl")
    with pytest.raises(CaptureError, match="torch.export.export failed") as info:
        surgeon_fx.capture(model, (), visual_inputs(model), strategy="whole")
    assert "blockwise capture failed" not in str(info.value)


def test_capture_unknown_strategy():
    with pytest.raises(CaptureError, match="unknown capture strategy 'parts'"):
        surgeon_fx.capture(causal_lm("llama"), (token_ids(),), strategy="parts")


def test_blockwise_strategy_matches_whole_on_llama(caplog):
    model, ids = causal_lm("llama"), token_ids()
    whole = surgeon_fx.analyze(surgeon_fx.capture(model, (ids,), strategy="whole"))
    with caplog.at_level(logging.INFO, logger="surgeon_fx"):
        blockwise = surgeon_fx.analyze(surgeon_fx.capture(model, (ids,), strategy="blockwise"))
    assert "strategy='blockwise' was requested" in caplog.text
    assert [(s.path, s.role, s.layer) for s in blockwise.sites] == [(s.path, s.role, s.layer) for s in whole.sites]
    assert [(op.num_heads, op.num_kv_heads, op.head_dim) for op in blockwise.attention] == [(4, 2, 16)] * 2


def test_compress_rejects_joined_graph():
    model, ids = causal_lm("llama"), token_ids()
    gm = surgeon_fx.capture(model, (ids,), strategy="blockwise")
    with pytest.raises(PlanError, match="does not compute the model"):
        surgeon_fx.compress(gm, {"lrd": [{"roles": ["mlp_down"], "rank": 4}]})


# --- Analysis ------------------------------------------------------------------------


def test_tower_names_from_stack_prefixes():
    assert tower_names(["model.visual.blocks", "model.language_model.layers"]) == {
        "model.visual.blocks": "vision", "model.language_model.layers": "text",
    }
    assert tower_names(["vision_model.encoder.layers", "decoder.layers"]) == {
        "vision_model.encoder.layers": "vision", "decoder.layers": "text",
    }
    assert tower_names(["model.layers"]) == {"model.layers": "model.layers"}
    assert tower_names(["encoder", "decoder"]) == {"encoder": "encoder", "decoder": "decoder"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("media", ["image", "video"])
def test_analysis_of_both_towers(kind, media, analyses):
    analysis = analyses(kind, media)
    assert analysis.towers == {"vision": "model.visual.blocks", "text": "model.language_model.layers"}
    mlp = ({"gate_proj": "mlp_gate", "up_proj": "mlp_up", "down_proj": "mlp_down"} if kind == "qwen2_5_vl"
           else {"fc1": "mlp_up", "fc2": "mlp_down"})
    expected = {}
    for layer in range(2):
        vision = f"model.visual.blocks.{layer}"
        expected[f"{vision}.attn.qkv"] = ("qkv", "vision", layer)
        expected[f"{vision}.attn.proj"] = ("attn_out", "vision", layer)
        expected.update({f"{vision}.mlp.{name}": (role, "vision", layer) for name, role in mlp.items()})
        text = f"model.language_model.layers.{layer}"
        for name, role in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "attn_out")):
            expected[f"{text}.self_attn.{name}"] = (role, "text", layer)
        for name, role in (("gate_proj", "mlp_gate"), ("up_proj", "mlp_up"), ("down_proj", "mlp_down")):
            expected[f"{text}.mlp.{name}"] = (role, "text", layer)
    expected["model.visual.merger.mlp.0"] = ("other", "vision", None)
    expected["model.visual.merger.mlp.2"] = ("other", "vision", None)
    expected["lm_head"] = ("other", None, None)
    assert {s.path: (s.role, s.tower, s.layer) for s in analysis.sites} == expected


def test_analysis_table_has_tower_column(analyses):
    table = analyses("qwen2_5_vl").table().splitlines()
    assert table[0].split()[:2] == ["tower", "layer"]
    assert table[2].split()[:3] == ["vision", "0", "qkv"]
    assert table[-1].split()[:3] == ["text", "1", "sdpa"]


@pytest.mark.parametrize("kind", KINDS)
def test_attention_geometry_per_tower(kind, analyses):
    analysis = analyses(kind, "video")
    geometry = [(op.tower, op.layer, op.num_heads, op.num_kv_heads, op.head_dim, op.fused_qkv, op.rotary)
                for op in analysis.attention]
    # One op per block, although the video's vision attention runs once per frame.
    assert geometry == [
        ("vision", 0, 4, 4, 8, True, True), ("vision", 1, 4, 4, 8, True, True),
        ("text", 0, 4, 2, 16, False, True), ("text", 1, 4, 2, 16, False, True),
    ]
    heads = [g for g in analysis.groups if g.unit == "heads"]
    assert all(g.unsupported is None for g in heads)
    fused = next(g for g in heads if g.sites[0].path == "model.visual.blocks.0.attn.qkv")
    # q, k and v sections of the fused (96, 32) weight start at rows 0, 32 and 64.
    assert [(s.offset, s.width, s.per) for s in fused.slots[:3]] == [(0, 8, "unit"), (32, 8, "kv"), (64, 8, "kv")]


# --- Compression of the live model ---------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_soft_per_tower_then_restore_bit_exact(kind):
    model = build(kind)
    inputs = visual_inputs(model)
    before, dense = state_snapshot(model), logits(model, inputs)
    manager = CompressionSchemesManager(model, PER_TOWER, (), inputs)
    manager.apply_all(hard=False)
    paths = {s.path for s in manager.schemes}
    assert "model.visual.blocks.0.attn.qkv" in paths
    assert "model.visual.blocks.1.attn.qkv" not in paths  # ratio 0 and rank "full" in block 1
    assert "model.language_model.layers.1.mlp.down_proj" in paths
    assert {s.state for s in manager.schemes} == {"soft"}
    assert "state soft" in str(manager)
    soft = logits(model, inputs)
    assert torch.isfinite(soft).all()
    assert not torch.equal(soft, dense)

    manager.restore_all()
    assert_state_equal(model, before)
    assert journal_of_model(model) is None
    assert torch.equal(logits(model, inputs), dense)


@pytest.mark.parametrize("kind", KINDS)
def test_hard_matches_soft_and_generates(kind):
    model = build(kind)
    inputs = visual_inputs(model)
    dense_params = count_params(model)
    manager = CompressionSchemesManager(model, PER_TOWER, (), inputs)
    manager.apply_all(hard=False)
    soft = logits(model, inputs)
    with warnings.catch_warnings():
        # Head and neuron counts differ per layer and per tower, which model.config cannot hold.
        warnings.simplefilter("ignore", SurgeonWarning)
        manager.apply_all(hard=True)
    hard = logits(model, inputs)
    assert torch.isfinite(hard).all()
    torch.testing.assert_close(hard, soft, atol=1e-5, rtol=1e-5)
    assert count_params(model) < dense_params

    attention = model.model.visual.blocks[0].attn
    assert attention.num_heads == 2
    assert attention.qkv.out_features == 48  # 3 sections of 2 heads of 8
    text = model.model.language_model.layers[0].self_attn
    assert (text.q_proj.out_features, text.k_proj.out_features, text.num_key_value_groups) == (32, 16, 2)

    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert output.shape == (1, inputs["input_ids"].shape[1] + 4)


def test_hard_with_video_matches_soft():
    model = build("qwen2_5_vl")
    inputs = visual_inputs(model, "video", (2, 4, 4))
    plan = {"prune": [{"towers": ["vision"], "unit": "heads", "ratio": 0.25}],
            "lrd": [{"towers": ["vision"], "roles": ["mlp_down"], "rank": 8}]}
    surgeon_fx.compress_model(model, plan, (), inputs)
    soft = logits(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SurgeonWarning)  # one count per tower fits each tower's config
        surgeon_fx.compress_model(model, plan, (), inputs, hard=True)
    torch.testing.assert_close(logits(model, inputs), soft, atol=1e-5, rtol=1e-5)
    assert [block.attn.num_heads for block in model.model.visual.blocks] == [3, 3]
    assert model.config.vision_config.num_heads == 3
    assert model.config.text_config.num_attention_heads == 4
    assert model.model.language_model.layers[0].self_attn.q_proj.out_features == 64


def test_strategy_reaches_live_capture(caplog):
    model, ids = causal_lm("llama"), token_ids()
    plan = {"lrd": [{"roles": ["mlp_down"], "rank": 4}]}
    with caplog.at_level(logging.INFO, logger="surgeon_fx"):
        manager = CompressionSchemesManager(model, plan, (ids,), strategy="blockwise")
    assert "strategy='blockwise' was requested" in caplog.text
    manager.apply_all()
    assert isinstance(model.model.layers[1].mlp.down_proj, surgeon_fx.LinearLRD)
    manager.restore_all()
    with pytest.raises(CaptureError, match="unknown capture strategy 'layers'"):
        surgeon_fx.compress_model(model, plan, (ids,), strategy="layers")
    assert journal_of_model(model) is None


def test_towers_selector_selects_one_tower():
    model = build("qwen2_5_vl")
    inputs = visual_inputs(model)
    surgeon_fx.compress_model(model, {"lrd": [{"towers": ["text"], "roles": ["mlp_down"], "rank": 4}]}, (), inputs)
    swapped = [swap.path for swap in journal_of_model(model).swaps]
    assert swapped == ["model.language_model.layers.0.mlp.down_proj", "model.language_model.layers.1.mlp.down_proj"]


def test_config_lists_must_match_tower_depth():
    model = build("qwen2_5_vl")
    config = CompressionConfig(lrd_rank_lists={"vision": {"sa_out": [4, 4, 4]}})
    with pytest.raises(PlanError, match=r"\['vision'\]\['sa_out'\] has 3 entries but 'vision' has 2 blocks"):
        CompressionSchemesManager(model, config, (), visual_inputs(model))


# --- Hidden-size (skip-connection) pruning ---------------------------------------------

SKIP = CompressionConfig(
    pruning_ratio_lists=PER_TOWER.pruning_ratio_lists, lrd_rank_lists=PER_TOWER.lrd_rank_lists,
    pruning_ratio_skip_connections=0.125,
)


def hidden_groups(model: nn.Module, inputs: dict, ratio: float = 0.125) -> dict:
    """Return the joined hidden-size group of each tower by name."""
    gm = surgeon_fx.capture(model, (), inputs)
    analysis = surgeon_fx.analyze(gm)
    plan = surgeon_fx.Plan.coerce({"prune": [{"unit": "hidden", "ratio": ratio}]})
    join_hidden_groups(model, analysis, plan, (), inputs)
    return {g.tower: g for g in analysis.groups if g.unit == "hidden"}


@pytest.mark.parametrize("kind", KINDS)
def test_hidden_groups_per_tower(kind):
    model = build(kind)
    groups = hidden_groups(model, visual_inputs(model))
    vision, text = groups["vision"], groups["text"]
    assert (vision.unsupported, text.unsupported) == (None, None)
    assert (vision.size, text.size) == (32, 64)
    slots = {str(slot) for slot in vision.slots}
    # The patch embedding writes the stream, and the merger folds 4 patches into one input of 4 * 32.
    assert "model.visual.patch_embed.proj.weight[0]" in slots
    merger_in = sorted(s.offset for s in vision.slots if s.target == "model.visual.merger.mlp.0")
    assert merger_in == [0, 32, 64, 96]
    assert "model.visual.merger.ln_q" in vision.norm_modules
    assert {f"model.visual.blocks.{b}.norm{n}" for b in (0, 1) for n in (1, 2)} <= set(vision.norm_modules)
    # The text stream starts at the token embedding and the merger's output, and ends at the head.
    slots = {str(slot) for slot in text.slots}
    assert {"model.language_model.embed_tokens.weight[1]", "model.visual.merger.mlp.2[out]", "lm_head[in]"} <= slots
    assert "model.language_model.norm" in text.norm_modules
    assert not any(path.startswith("model.visual.blocks") for path in text.norm_modules)


@pytest.mark.parametrize("kind", KINDS)
def test_skip_pruning_soft_restore_hard(kind, tmp_path):
    model = build(kind)
    inputs = visual_inputs(model)
    before, dense = state_snapshot(model), logits(model, inputs)
    manager = CompressionSchemesManager(model, SKIP, (), inputs)
    manager.apply_all(hard=False)
    soft = logits(model, inputs)
    assert torch.isfinite(soft).all()
    assert not torch.equal(soft, dense)
    roles = {s.path: s.role for s in manager.schemes}
    assert roles["model.language_model.embed_tokens"] == "embedding"
    assert roles["model.visual.merger.ln_q"] == "norm"
    manager.restore_all()
    assert_state_equal(model, before)
    assert torch.equal(logits(model, inputs), dense)

    manager.apply_all(hard=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeonWarning)  # head counts differ per layer
        manager.apply_all(hard=True)
    torch.testing.assert_close(logits(model, inputs), soft, atol=1e-5, rtol=1e-5)
    assert model.model.visual.patch_embed.proj.weight.shape[0] == 28  # 32 - 4 channels
    assert model.model.language_model.norm.weight.shape == (56,)  # 64 - 8 channels
    assert model.lm_head.in_features == 56
    assert model.model.visual.merger.mlp[0].in_features == 4 * 28
    vision_width = "hidden_size" if kind == "qwen2_5_vl" else "embed_dim"  # Qwen2-VL's hidden_size is the text's
    assert getattr(model.config.vision_config, vision_width) == 28
    assert model.config.text_config.hidden_size == 56
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert output.shape == (1, inputs["input_ids"].shape[1] + 4)

    surgeon_fx.save(model, tmp_path / "checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeonWarning)
        reloaded = surgeon_fx.load(tmp_path / "checkpoint", build(kind, seed=1))
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))


@pytest.mark.parametrize("kind, media, grid", [
    ("qwen2_5_vl", "image", (1, 8, 8)),  # 4 attention windows: the blocks are traced, not exported
    ("qwen2_5_vl", "video", (2, 4, 4)),
    ("qwen2_vl", "video", (2, 4, 4)),
])
def test_skip_pruning_traced_blocks(kind, media, grid):
    model = build(kind)
    inputs = visual_inputs(model, media, grid)
    surgeon_fx.compress_model(model, {"prune": [{"unit": "hidden", "ratio": 0.25}]}, (), inputs)
    soft = logits(model, inputs)
    surgeon_fx.compress_model(model, {}, (), inputs, hard=True)
    torch.testing.assert_close(logits(model, inputs), soft, atol=1e-5, rtol=1e-5)
    assert model.model.visual.blocks[0].norm1.weight.shape == (24,)


def test_skip_pruning_one_tower():
    model = build("qwen2_5_vl")
    inputs = visual_inputs(model)
    surgeon_fx.compress_model(model, {"prune": [{"unit": "hidden", "ratio": 0.25, "towers": ["text"]}]}, (), inputs)
    swapped = {swap.path for swap in journal_of_model(model).swaps}
    assert "model.visual.merger.mlp.2" in swapped  # writes the text stream
    assert "model.language_model.layers.1.post_attention_layernorm" in swapped
    assert not any(p.startswith("model.visual.blocks") or "patch_embed" in p for p in swapped)
    soft = logits(model, inputs)
    surgeon_fx.compress_model(model, {}, (), inputs, hard=True)
    torch.testing.assert_close(logits(model, inputs), soft, atol=1e-5, rtol=1e-5)
    assert model.config.vision_config.hidden_size == 32
    assert model.config.text_config.hidden_size == 48


def test_skip_pruning_tied_embeddings_rejected():
    model = build("qwen2_5_vl")
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    inputs = visual_inputs(model)
    before = state_snapshot(model)
    with pytest.raises(PlanError, match=r"hidden \(text\)' cannot be pruned: .*tied weights"):
        surgeon_fx.compress_model(model, {"prune": [{"unit": "hidden", "ratio": 0.25}]}, (), inputs)
    assert_state_equal(model, before)
    assert hidden_groups(model, inputs)["vision"].unsupported is None


def test_skip_ratio_per_tower_config():
    model = build("qwen2_5_vl")
    inputs = visual_inputs(model)
    config = CompressionConfig(pruning_ratio_skip_connections={"vision": 0.25, "text": 0.0})
    plan = config.to_plan(surgeon_fx.analyze(surgeon_fx.capture(model, (), inputs)))
    assert [(r.unit, r.selector.towers, r.ratio) for r in plan.prune] == [("hidden", ("vision",), 0.25)]
    assert CompressionConfig.from_plan(plan, {"vision": 2, "text": 2}).pruning_ratio_skip_connections == {"vision": 0.25}
    with pytest.raises(PlanError, match=r"the tower 'vision', but num_blocks is one count; pass a dict"):
        CompressionConfig.from_plan(PER_TOWER.to_plan(), 2)
    manager = CompressionSchemesManager(model, config, (), inputs)
    manager.apply_all(hard=False)
    swapped = {swap.path for swap in journal_of_model(model).swaps}
    assert "model.visual.patch_embed.proj" in swapped
    assert "model.visual.merger.mlp.0" in swapped
    assert not any(p.startswith("model.language_model") or p == "lm_head" for p in swapped)


def test_skip_rule_by_stack_prefix():
    model = build("qwen2_5_vl")
    inputs = visual_inputs(model)
    config = CompressionConfig(pruning_ratio_skip_connections={"model.language_model.layers": 0.25})
    CompressionSchemesManager(model, config, (), inputs).apply_all()
    swapped = {swap.path for swap in journal_of_model(model).swaps}
    assert "lm_head" in swapped and not any("patch_embed" in p for p in swapped)


@pytest.mark.parametrize("skip, message", [
    ({"audio": 0.1}, r"pruning_ratio_skip_connections\['audio'\]: the model has no blocks 'audio'"),
    ({"vision": 1.0}, r"pruning_ratio_skip_connections\['vision'\]: invalid pruning ratio 1.0"),
    ({"text": 0.25, "model.language_model.layers": 0.125}, r"names the tower 'text' twice, as 'text' and 'model"),
])
def test_skip_ratio_per_tower_rejected(skip, message):
    model = build("qwen2_5_vl")
    before = state_snapshot(model)
    with pytest.raises(PlanError, match=message):
        CompressionSchemesManager(model, CompressionConfig(pruning_ratio_skip_connections=skip), (), visual_inputs(model))
    assert_state_equal(model, before)


def test_soft_save_load_then_restore(tmp_path):
    model = build("qwen2_5_vl")
    inputs = visual_inputs(model)
    surgeon_fx.compress_model(model, {"prune": [{"unit": "hidden", "ratio": 0.25}]}, (), inputs)
    surgeon_fx.save(model, tmp_path / "soft")
    base = build("qwen2_5_vl")
    dense = logits(base, inputs)
    reloaded = surgeon_fx.load(tmp_path / "soft", base)
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))
    surgeon_fx.restore_model(reloaded)
    assert torch.equal(logits(reloaded, inputs), dense)


def test_missed_stream_writer_rejected():
    model = build("qwen2_5_vl")
    inputs = visual_inputs(model)
    before = state_snapshot(model)
    gm = surgeon_fx.capture(model, (), inputs)
    analysis = surgeon_fx.analyze(gm)
    plan = surgeon_fx.Plan.coerce({"prune": [{"unit": "hidden", "ratio": 0.25, "towers": ["text"]}]})
    join_hidden_groups(model, analysis, plan, (), inputs)
    text = next(g for g in analysis.groups if g.unit == "hidden" and g.tower == "text")
    # Forget that the token embedding writes the stream: its removed channels stay non-zero.
    text.slots = [s for s in text.slots if "embed_tokens" not in s.target]
    with pytest.raises(PlanError, match="non-zero values in removed channels"):
        apply_plan(model, analysis, plan, None, (), inputs, hard=False)
    assert_state_equal(model, before)
    assert journal_of_model(model) is None


def test_calibrated_lrd_on_blockwise_capture():
    """SVD-LLM statistics come from hooks on the live model; per layer it beats plain SVD on them."""
    model = build("qwen2_5_vl")
    inputs = visual_inputs(model)
    site = "model.visual.blocks.1.mlp.down_proj"
    layer = model.get_submodule(site)
    seen = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    logits(model, inputs)
    handle.remove()
    x = seen[0]  # (16 patches, 64)
    with torch.no_grad():
        dense = layer(x)

    errors = {}
    for method in ("svd", "svd-llm"):
        plan = {"lrd": [{"paths": [site], "rank": 4, "method": method}]}
        surgeon_fx.compress_model(model, plan, (), inputs, calibration=[inputs, visual_inputs(model, grid=(1, 4, 8))])
        with torch.no_grad():
            errors[method] = float((model.get_submodule(site)(x) - dense).norm())
        surgeon_fx.restore_model(model)
    assert errors["svd-llm"] < errors["svd"]


def test_calibration_missing_tower_rejected():
    model = build("qwen2_5_vl")
    inputs = visual_inputs(model)
    text_only = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    before = state_snapshot(model)
    plan = {"lrd": [{"roles": ["mlp_down"], "rank": 4, "method": "svd-llm"}]}
    with pytest.raises(PlanError, match=r"never ran \['model.visual.blocks.0.mlp.down_proj'.*\['vision'\]"):
        surgeon_fx.compress_model(model, plan, (), inputs, calibration=[text_only])
    assert_state_equal(model, before)
    plan = {"lrd": [{"roles": ["mlp_down"], "rank": 4, "method": "svd-llm", "towers": ["text"]}]}
    surgeon_fx.compress_model(model, plan, (), inputs, calibration=[text_only])
    assert len(journal_of_model(model).swaps) == 2


def test_save_load_round_trip(tmp_path):
    model = build("qwen2_5_vl")
    inputs = visual_inputs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeonWarning)
        surgeon_fx.compress_model(model, PER_TOWER, (), inputs, hard=True)
    surgeon_fx.save(model, tmp_path / "checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeonWarning)
        reloaded = surgeon_fx.load(tmp_path / "checkpoint", build("qwen2_5_vl", seed=1))
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))
    assert reloaded.model.visual.blocks[0].attn.num_heads == 2
    assert count_params(reloaded) == count_params(model)


def test_quickstart_example():
    result = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "state soft" in result.stdout
    assert "model.visual.blocks.1.attn.qkv" in result.stdout
    assert "model.language_model.layers.1.mlp.down_proj" in result.stdout
    assert "model.visual.patch_embed.proj" in result.stdout  # the 10% hidden-size pruning
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line and not line[0].isspace())
    assert lines["restored equals dense"] == "True"
