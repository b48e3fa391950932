"""CompressionConfig and CompressionSchemesManager: the transformer-surgeon style API."""

from __future__ import annotations

import pytest
import torch
from causal_lms import assert_state_equal, causal_lm, generate, logits, state_snapshot, token_ids
from torch import nn
from user_models import UserBlock

import surgeon_fx
from surgeon_fx import (
    CompressionConfig,
    CompressionSchemesManager,
    LinearLRD,
    MaskedLinear,
    Plan,
    PlanError,
    RestoreError,
    SurgeonError,
    SurgeonWarning,
)
from surgeon_fx.live import journal_of_model


def seed_config() -> CompressionConfig:
    """The quick-start configuration: per-layer lists for a 2-layer model."""
    return CompressionConfig(
        pruning_ratio_lists={"sa_qkv": [0.5, 0.0], "mlp_up": [0.25, 0.5]},
        lrd_rank_lists={"sa_qkv": [8, "full"], "sa_out": [16, 16], "mlp_up": [16, 16], "mlp_down": [16, "full"]},
        pruning_ratio_skip_connections=0.0,
    )


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_seed_config_soft_print_restore(name):
    model, ids = causal_lm(name), token_ids()
    before = state_snapshot(model)
    reference = logits(model, ids)
    manager = CompressionSchemesManager(model, seed_config(), (ids,))
    assert manager.state == "pending"
    assert_state_equal(model, before)

    manager.apply_all(hard=False)
    text = str(manager)
    assert manager.state == "soft"
    assert "model.layers.0.self_attn.q_proj" in text
    assert "prune:heads+lrd:svd" in text
    assert text.count(" soft ") == len(manager.schemes)
    assert isinstance(model.model.layers[0].self_attn.q_proj, MaskedLinear)
    assert isinstance(model.model.layers[1].self_attn.o_proj, LinearLRD)
    assert generate(model, ids).shape == (2, 12)

    manager.restore_all()
    assert manager.state == "pending"
    assert_state_equal(model, before)
    assert torch.equal(logits(model, ids), reference)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_seed_config_hard_after_soft(name):
    model, ids = causal_lm(name), token_ids()
    dense = sum(p.numel() for p in model.parameters())
    manager = CompressionSchemesManager(model, seed_config(), (ids,))
    manager.apply_all()
    o_proj = model.model.layers[1].self_attn.o_proj
    with torch.no_grad():
        o_proj.u.mul_(1.5)  # a stand-in for fine-tuning
    soft = logits(model, ids)

    with pytest.warns(SurgeonWarning, match="per layer"):
        manager.apply_all(hard=True)
    assert manager.state == "hard"
    assert model.model.layers[1].self_attn.o_proj is o_proj
    assert model.model.layers[0].self_attn.q_proj.out_features == 32
    assert model.model.layers[0].mlp.up_proj.out_features == 96
    torch.testing.assert_close(logits(model, ids), soft, atol=1e-5, rtol=1e-5)
    compressed = sum(p.numel() for p in model.parameters())
    assert compressed == dense - sum(s.params_before - s.params_after for s in manager.schemes)
    assert generate(model, ids).shape == (2, 12)
    with pytest.raises(RestoreError, match="hard-compressed"):
        manager.restore_all()


def test_soft_twice_keeps_fine_tuned_weights():
    model, ids = causal_lm("llama"), token_ids()
    manager = CompressionSchemesManager(model, seed_config(), (ids,))
    manager.apply_all()
    up = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        up.inner.u.add_(0.5)
    tuned = up.inner.u.detach().clone()
    with pytest.warns(SurgeonWarning, match="already soft-compressed"):
        manager.apply_all()
    assert model.model.layers[0].mlp.up_proj is up
    assert torch.equal(up.inner.u, tuned)


def test_manager_rejects_compressed_model():
    model, ids = causal_lm("llama"), token_ids()
    surgeon_fx.compress_model(model, {"lrd": [{"roles": ["mlp_down"], "rank": 8}]}, (ids,))
    with pytest.raises(SurgeonError, match="soft-compressed already; restore it first"):
        CompressionSchemesManager(model, seed_config(), (ids,))


def test_schemes_filter():
    model, ids = causal_lm("llama"), token_ids()
    manager = CompressionSchemesManager(model, seed_config(), (ids,))
    schemes = manager.schemes
    assert {s.state for s in schemes} == {"pending"}
    assert [s.path for s in schemes.filter(layer=1, role="attn_out")] == ["model.layers.1.self_attn.o_proj"]
    assert {s.role for s in schemes.filter(path="*.mlp.*")} == {"mlp_up", "mlp_gate", "mlp_down"}
    assert all(s.layer == 0 for s in schemes.filter(layer=[0], role=("q", "k")))
    q = schemes.filter(layer=0, role="q")[0]
    assert (q.rank, q.ratio) == (8, 0.5)
    assert q.params_after == 8 * (64 + 32)  # rank 8 of the 32x64 weight left by pruning half the heads


def test_manager_with_plan_and_graph_module():
    model, ids = causal_lm("llama"), token_ids()
    gm = surgeon_fx.capture(model, (ids,))
    reference = gm(ids)
    plan = {"lrd": [{"roles": ["mlp_down"], "rank": 16}], "prune": [{"unit": "hidden", "ratio": 0.25}]}
    manager = CompressionSchemesManager(gm, plan, (ids,))
    manager.apply_all()
    assert manager.state == "soft"
    assert "prune:hidden+lrd:svd" in str(manager)
    manager.restore_all()
    assert torch.equal(gm(ids)[0], reference[0])


def test_config_plan_round_trip():
    config = seed_config()
    plan = config.to_plan()
    assert plan.lrd[0].selector.roles == ("q", "k", "v", "qkv")
    assert plan.lrd[0].selector.layers == (0,)
    assert [r.unit for r in plan.prune] == ["heads", "mlp_neurons", "mlp_neurons"]
    back = CompressionConfig.from_plan(Plan.from_dict(plan.to_dict()), 2)
    assert back.to_dict() == config.to_dict()


def test_config_mlp_gate_overrides_up():
    config = CompressionConfig(lrd_rank_lists={"mlp_up": [8, 8], "mlp_gate": ["full", 4]})
    rules = config.to_plan().lrd
    assert rules[0].selector.roles == ("mlp_up", "mlp_gate_up")
    assert (rules[1].selector.roles, rules[1].rank, rules[1].selector.layers) == (("mlp_gate",), 4, (1,))
    assert CompressionConfig.from_plan(config.to_plan(), 2).to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lrd_rank_lists": {"sa_kqv": [8, 8]}}, "unknown key 'sa_kqv'"),
        ({"lrd_rank_lists": {"sa_qkv": [8, 0]}}, r"\['sa_qkv'\]\[1\]: invalid rank 0"),
        ({"lrd_rank_lists": {"mlp_down": [8, "half"]}}, r"\['mlp_down'\]\[1\]: invalid rank 'half'"),
        ({"lrd_rank_lists": {"mlp_down": 8}}, r"\['mlp_down'\] must be a list"),
        ({"pruning_ratio_lists": {"mlp_up": [1.0, 0.0]}}, r"\['mlp_up'\]\[0\]: invalid pruning ratio 1.0"),
        ({"pruning_ratio_lists": {"sa_qkv": [-0.1, 0.0]}}, r"invalid pruning ratio -0.1"),
        ({"pruning_ratio_lists": {"sa_out": [0.5, 0.0]}}, "pruning_ratio_skip_connections instead"),
        ({"pruning_ratio_lists": {"mlp_up": [0.5, 0.0], "mlp_gate": [0.25, 0.0]}}, r"\['mlp_up'\]\[0\] is 0.5"),
        ({"pruning_ratio_skip_connections": 1.5}, "pruning_ratio_skip_connections: invalid pruning ratio 1.5"),
        ({"lrd_method": "pca"}, "lrd_method 'pca' is unknown"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(PlanError, match=message):
        CompressionConfig(**kwargs)


@pytest.mark.parametrize(
    "config, message",
    [
        (CompressionConfig(lrd_rank_lists={"sa_qkv": [8, 8, 8]}), r"\['sa_qkv'\] has 3 entries but 'model.layers' has 2"),
        (CompressionConfig(pruning_ratio_lists={"mlp_up": [0.5]}), r"\['mlp_up'\] has 1 entries"),
        (CompressionConfig(lrd_rank_lists={"sa_out": [8, 100]}), "rank 100 exceeds"),
        (CompressionConfig(lrd_rank_lists={"model.decoder": {"sa_out": [8, 8]}}), "no blocks 'model.decoder'"),
        (CompressionConfig(pruning_ratio_lists={"sa_qkv": [0.25, 0.0]}), "cannot be met"),
    ],
)
def test_manager_rejects_config_for_model(config, message):
    model, ids = causal_lm("llama"), token_ids()
    before = state_snapshot(model)
    with pytest.raises(PlanError, match=message):
        CompressionSchemesManager(model, config, (ids,))
    assert_state_equal(model, before)
    assert journal_of_model(model) is None


class TwoStacks(nn.Module):
    """Two kinds of blocks, like a vision tower and a language model: 2 encoder and 3 decoder blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(UserBlock(32, 4, "sdpa") for _ in range(2))
        self.decoder = nn.ModuleList(UserBlock(32, 4, "sdpa") for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in [*self.encoder, *self.decoder]:
            x = block(x)
        return x


def test_nested_config_for_two_kinds_of_blocks():
    torch.manual_seed(0)
    model = TwoStacks().eval()
    x = torch.randn(2, 8, 32)
    config = CompressionConfig(
        lrd_rank_lists={"encoder": {"mlp_down": [4, "full"]}, "decoder": {"sa_out": [8, 8, 2]}}
    )
    manager = CompressionSchemesManager(model, config, (x,))
    assert [s.path for s in manager.schemes] == [
        "encoder.0.fc_out", "decoder.0.attn.out", "decoder.1.attn.out", "decoder.2.attn.out",
    ]
    manager.apply_all()
    assert model.encoder[0].fc_out.rank == 4
    assert model.decoder[2].attn.out.rank == 2
    assert isinstance(model.encoder[1].fc_out, nn.Linear)
    back = CompressionConfig.from_plan(manager.plan, {"encoder": 2, "decoder": 3})
    assert back.to_dict()["lrd_rank_lists"] == config.to_dict()["lrd_rank_lists"]


def test_flat_config_rejected_for_two_kinds_of_blocks():
    torch.manual_seed(0)
    model = TwoStacks().eval()
    with pytest.raises(PlanError, match=r"flat but the model has 2 kinds of blocks \['decoder', 'encoder'\]"):
        CompressionSchemesManager(model, CompressionConfig(lrd_rank_lists={"sa_out": [8, 8]}), (torch.randn(2, 8, 32),))


def test_key_without_sites_rejected():
    torch.manual_seed(0)
    model = TwoStacks().eval()
    config = CompressionConfig(lrd_rank_lists={"encoder": {"mlp_gate": [4, 4]}})
    with pytest.raises(PlanError, match=r"\['encoder'\]\['mlp_gate'\]: 'encoder' has no site with role in \['mlp_gate'\]"):
        CompressionSchemesManager(model, config, (torch.randn(2, 8, 32),))


def test_pruned_rank_rejected_at_construction():
    model, ids = causal_lm("llama"), token_ids()
    config = CompressionConfig(lrd_rank_lists={"mlp_down": [60, 60]}, pruning_ratio_skip_connections=0.125)
    before = state_snapshot(model)
    with pytest.raises(PlanError, match=r"rank 60 exceeds .* = 56 of model.layers.0.mlp.down_proj after pruning"):
        CompressionSchemesManager(model, config, (ids,))
    assert_state_equal(model, before)
