"""compress_model / restore_model on live causal LMs: generate(), soft vs hard, counts, rollback."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from causal_lms import assert_state_equal, causal_lm, generate, logits, state_snapshot, token_ids
from torch import nn
from user_models import user_transformer

import surgeon_fx
from surgeon_fx import LinearLRD, MaskedLinear, PlanError, RestoreError, SurgeonError, SurgeonWarning
from surgeon_fx.live import journal_of_model
from surgeon_fx.live_hidden import KeptChannelNorm, MaskedChannels

MODELS = ["llama", "qwen2"]
LRD = {"lrd": [{"roles": ["q", "v", "attn_out", "mlp_down"], "rank": 8}]}
NEURONS = {"prune": [{"unit": "mlp_neurons", "ratio": 0.25}]}
HEADS = {"prune": [{"unit": "heads", "ratio": 0.5}]}
HEADS_LAYER0 = {"prune": [{"unit": "heads", "ratio": 0.5, "layers": [0]}]}
PLANS = {"lrd": LRD, "neurons": NEURONS, "heads": HEADS}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kind", ["lrd", "neurons", "heads"])
def test_generate_after_soft_and_hard(name, kind):
    model, ids = causal_lm(name), token_ids()
    dense_params = count_params(model)
    surgeon_fx.compress_model(model, PLANS[kind], (ids,))
    soft = logits(model, ids)
    soft_tokens = generate(model, ids)
    assert soft_tokens.shape == (2, 12)

    surgeon_fx.compress_model(model, PLANS[kind], (ids,), hard=True)
    hard = logits(model, ids)
    hard_tokens = generate(model, ids)
    assert hard_tokens.shape == (2, 12)
    assert torch.isfinite(hard).all()
    torch.testing.assert_close(hard, soft, atol=1e-5, rtol=1e-5)
    assert torch.equal(hard_tokens, soft_tokens)
    assert count_params(model) < dense_params
    assert not any(isinstance(m, MaskedLinear) for m in model.modules())


def test_hard_lrd_from_start_matches_soft():
    soft_model, hard_model, ids = causal_lm("llama"), causal_lm("llama"), token_ids()
    surgeon_fx.compress_model(soft_model, LRD, (ids,))
    surgeon_fx.compress_model(hard_model, LRD, (ids,), hard=True)
    assert isinstance(hard_model.model.layers[0].mlp.down_proj, LinearLRD)
    assert journal_of_model(hard_model).swaps[0].previous is None
    torch.testing.assert_close(logits(hard_model, ids), logits(soft_model, ids), atol=0, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_uniform_head_pruning_updates_config(name):
    model, ids = causal_lm(name), token_ids()
    surgeon_fx.compress_model(model, HEADS, (ids,), hard=True)
    attention = model.model.layers[1].self_attn
    assert attention.q_proj.out_features == 32  # 2 query heads of 16
    assert attention.k_proj.out_features == 16  # 1 key/value head
    assert attention.o_proj.in_features == 32
    assert attention.num_key_value_groups == 2
    assert model.config.num_attention_heads == 2
    assert model.config.num_key_value_heads == 1
    assert model.config.head_dim == 16
    assert generate(model, ids).shape == (2, 12)


def test_per_layer_heads_warn_and_keep_config():
    model, ids = causal_lm("llama"), token_ids()
    with pytest.warns(SurgeonWarning, match="head counts per layer"):
        surgeon_fx.compress_model(model, HEADS_LAYER0, (ids,), hard=True)
    assert model.config.num_attention_heads == 4
    assert model.model.layers[0].self_attn.q_proj.out_features == 32
    assert model.model.layers[1].self_attn.q_proj.out_features == 64
    assert generate(model, ids).shape == (2, 12)


def test_uniform_neurons_update_config():
    model, ids = causal_lm("qwen2"), token_ids()
    surgeon_fx.compress_model(model, NEURONS, (ids,), hard=True)
    assert model.config.intermediate_size == 96
    for layer in model.model.layers:
        assert layer.mlp.up_proj.out_features == 96
        assert layer.mlp.down_proj.in_features == 96


@pytest.mark.parametrize("name", MODELS)
def test_soft_restore_is_bit_exact(name):
    model, ids = causal_lm(name), token_ids()
    before = state_snapshot(model)
    modules = dict(model.named_modules())
    reference = logits(model, ids)
    plan = {**LRD, **HEADS_LAYER0}
    surgeon_fx.compress_model(model, plan, (ids,))
    assert not torch.equal(logits(model, ids), reference)
    surgeon_fx.restore_model(model)
    assert_state_equal(model, before)
    assert all(module is modules[path] for path, module in model.named_modules())
    assert torch.equal(logits(model, ids), reference)
    assert journal_of_model(model) is None


def test_soft_state_dict_holds_compressed_modules():
    model, ids = causal_lm("llama"), token_ids()
    surgeon_fx.compress_model(model, {**LRD, **NEURONS}, (ids,))
    keys = set(model.state_dict())
    assert "model.layers.0.mlp.down_proj.inner.u" in keys
    assert "model.layers.0.mlp.down_proj.in_mask" in keys
    assert "model.layers.0.mlp.up_proj.out_mask" in keys
    assert "model.layers.0.self_attn.q_proj.weight" not in keys


def test_soft_pruning_survives_training():
    model, ids = causal_lm("llama"), token_ids()
    surgeon_fx.compress_model(model, NEURONS, (ids,))
    up = model.model.layers[0].mlp.up_proj
    pruned = (up.out_mask == 0).nonzero().flatten()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    hidden = torch.randn(3, 64)
    assert torch.equal(up(hidden)[:, pruned], torch.zeros(3, len(pruned)))


def test_phi3_hard_head_pruning_rejected():
    # Phi-3 slices its fused qkv output with sizes from model.config, which has one
    # head count for all layers.
    model, ids = causal_lm("phi3"), token_ids()
    before = state_snapshot(model)
    with pytest.raises(PlanError, match="cannot run with the pruned head or neuron counts") as error:
        surgeon_fx.compress_model(model, HEADS_LAYER0, (ids,), hard=True)
    assert "Phi3ForCausalLM" in str(error.value)
    assert_state_equal(model, before)
    assert journal_of_model(model) is None
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, nn.Linear)

    surgeon_fx.compress_model(model, HEADS_LAYER0, (ids,))  # masks keep every size
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, MaskedLinear)
    assert torch.isfinite(logits(model, ids)).all()


def test_gpt2_fused_qkv_head_pruning():
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model, ids = transformers.GPT2LMHeadModel(config).eval(), token_ids()
    surgeon_fx.compress_model(model, HEADS, (ids,))
    soft = logits(model, ids)
    surgeon_fx.compress_model(model, HEADS, (ids,), hard=True)
    attention = model.transformer.h[0].attn
    assert attention.c_attn.out_features == 96  # (q, k, v) x 2 heads x 16
    assert attention.split_size == 32
    assert attention.num_heads == 2
    assert model.config.n_head == 2
    torch.testing.assert_close(logits(model, ids), soft, atol=1e-5, rtol=1e-5)
    assert generate(model, ids).shape == (2, 12)


def test_user_model_with_fixed_head_count_rejected():
    model, ids = user_transformer()
    before = state_snapshot(model)
    reference = model(ids)
    with pytest.raises(PlanError, match="Nothing was changed"):
        surgeon_fx.compress_model(model, HEADS, (ids,), hard=True)
    assert_state_equal(model, before)
    assert torch.equal(model(ids), reference)


def test_soft_then_rejected_hard_keeps_soft():
    model, ids = user_transformer()
    surgeon_fx.compress_model(model, HEADS, (ids,))
    soft = model(ids)
    with pytest.raises(PlanError, match="cannot run"):
        surgeon_fx.compress_model(model, HEADS, (ids,), hard=True)
    assert journal_of_model(model).state == "soft"
    assert torch.equal(model(ids), soft)
    surgeon_fx.restore_model(model)


def test_hard_is_permanent():
    model, ids = causal_lm("llama"), token_ids()
    surgeon_fx.compress_model(model, LRD, (ids,), hard=True)
    with pytest.raises(RestoreError, match="hard-compressed"):
        surgeon_fx.restore_model(model)
    with pytest.raises(SurgeonError, match="permanent"):
        surgeon_fx.compress_model(model, LRD, (ids,))


@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_hidden_pruning_on_live_model(name):
    model, ids = causal_lm(name), token_ids()
    before, dense = state_snapshot(model), logits(model, ids)
    plan = {"prune": [{"unit": "hidden", "ratio": 0.25}]}
    surgeon_fx.compress_model(model, plan, (ids,))
    soft = logits(model, ids)
    assert isinstance(model.model.embed_tokens, MaskedChannels)
    assert isinstance(model.model.norm, KeptChannelNorm)
    surgeon_fx.restore_model(model)
    assert_state_equal(model, before)
    assert torch.equal(logits(model, ids), dense)

    surgeon_fx.compress_model(model, plan, (ids,), hard=True)
    torch.testing.assert_close(logits(model, ids), soft, atol=1e-5, rtol=1e-5)
    assert model.config.hidden_size == 48
    assert model.model.embed_tokens.weight.shape[1] == 48
    assert model.lm_head.in_features == 48
    assert generate(model, ids).shape == (2, ids.shape[1] + 4)


def test_class_token_hidden_pruning_rejected():
    model = transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=8,
    )).eval()
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    before = state_snapshot(model)
    with pytest.raises(PlanError, match=r"'cls_token' \(dim 2\) of embeddings \(ViTEmbeddings\)"):
        surgeon_fx.compress_model(model, {"prune": [{"unit": "hidden", "ratio": 0.25}]}, (pixels,))
    assert_state_equal(model, before)
    assert journal_of_model(model) is None


def test_rank_above_pruned_size_rejected():
    model, ids = causal_lm("llama"), token_ids()
    before = state_snapshot(model)
    plan = {"prune": [{"unit": "heads", "ratio": 0.5}], "lrd": [{"roles": ["k"], "rank": 32}]}
    with pytest.raises(PlanError, match=r"rank 32 exceeds .* = 16 of model\.layers\.0\.self_attn\.k_proj"):
        surgeon_fx.compress_model(model, plan, (ids,))
    assert_state_equal(model, before)


def test_invalid_plan_leaves_model_unchanged():
    model, ids = causal_lm("qwen2"), token_ids()
    before = state_snapshot(model)
    with pytest.raises(PlanError, match="rank 65 exceeds"):
        surgeon_fx.compress_model(model, {"lrd": [{"roles": ["q"], "rank": 65}]}, (ids,))
    assert_state_equal(model, before)
    assert journal_of_model(model) is None


def test_dummy_inputs_used_without_args():
    model, ids = causal_lm("llama"), token_ids()
    surgeon_fx.compress_model(model, LRD)
    assert isinstance(model.model.layers[1].self_attn.o_proj, LinearLRD)
    assert generate(model, ids).shape == (2, 12)


def test_calibrated_method_on_live_model():
    model, ids = causal_lm("llama"), token_ids()
    plan = {"lrd": [{"roles": ["mlp_down"], "rank": 16, "method": "svd-llm"}]}
    batches = [(token_ids(2, 8),), (token_ids(1, 12),)]
    surgeon_fx.compress_model(model, plan, (ids,), calibration=batches)
    assert journal_of_model(model).rewrites[0]["method"] == "lrd:svd-llm"
    assert torch.isfinite(logits(model, ids)).all()


def test_restore_of_uncompressed_model_is_noop():
    model = causal_lm("llama")
    before = state_snapshot(model)
    assert surgeon_fx.restore_model(model) is model
    assert_state_equal(model, before)


def test_masked_linear_matches_pruned_linear():
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    out_idx, in_idx = [0, 2, 3], [1, 2, 4, 5]
    in_mask = torch.zeros(6)
    in_mask[in_idx] = 1
    out_mask = torch.zeros(5)
    out_mask[out_idx] = 1
    masked = MaskedLinear(linear, in_mask, out_mask)
    x = torch.randn(4, 6)
    small = masked.to_hard()
    expected = F.linear(x[:, in_idx], linear.weight[out_idx][:, in_idx], linear.bias[out_idx])
    torch.testing.assert_close(small(x[:, in_idx]), expected)
    torch.testing.assert_close(masked(x)[:, out_idx], expected)
    assert (small.out_features, small.in_features) == (3, 4)


def test_no_warnings_for_uniform_hard_pruning():
    model, ids = causal_lm("llama"), token_ids()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SurgeonWarning)
        surgeon_fx.compress_model(model, {"prune": HEADS["prune"] + NEURONS["prune"]}, (ids,), hard=True)


@pytest.mark.parametrize("rule, fix", [
    ({"unit": "hidden", "ratio": 0.1, "round_to": 8}, "raise the ratio to at least 0.1172"),
    ({"unit": "mlp_neurons", "ratio": 0.25, "round_to": 256}, "lower round_to"),
    ({"unit": "mlp_neurons", "ratio": 0.001}, "raise the ratio to at least 0.004"),
])
def test_idle_prune_rule_warns(rule, fix):
    model, ids = causal_lm("llama"), token_ids()
    before = state_snapshot(model)
    with pytest.warns(SurgeonWarning, match=fix) as caught:
        surgeon_fx.compress_model(model, {"prune": [rule]}, (ids,))
    assert any("changes no module" in str(w.message) for w in caught)
    assert_state_equal(model, before)
    assert journal_of_model(model) is None


@pytest.mark.parametrize("rule", [
    {"unit": "hidden", "ratio": 0.1, "round_to": 8},
    {"unit": "mlp_neurons", "ratio": 0.001},
    {"unit": "mlp_neurons", "ratio": 0.2, "round_to": 32},
])
def test_suggested_ratio_prunes(rule):
    model, ids = causal_lm("llama"), token_ids()
    with pytest.warns(SurgeonWarning, match="raise the ratio to at least") as caught:
        surgeon_fx.compress_model(model, {"prune": [rule]}, (ids,))
    suggested = float(re.search(r"at least ([0-9.]+)", str(caught[0].message)).group(1))
    surgeon_fx.compress_model(model, {"prune": [{**rule, "ratio": suggested}]}, (ids,))
    assert journal_of_model(model) is not None
