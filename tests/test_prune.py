"""Tests for structured pruning: ``compress(gm, {"prune": [...]}, hard=...)``.

For each model case and unit, the hard-pruned graph computes what the soft-pruned
one computes (float32, 1e-5) and has exactly the predicted parameter count. It runs
at a new batch size and sequence length and exports again with ``torch.export``.
A soft prune restores bit for bit. Bad plans raise ``PlanError`` and leave the
graph module untouched.
"""

from __future__ import annotations

import copy

import pytest
import torch

import surgeon_fx
from models import CASES, VOCAB, minilm, output_tensor
from surgeon_fx import LinearLRD, PlanError
from surgeon_fx.passes.manager import journal_of

TOLERANCE = 1e-5

UNIT_CASES = [
    (name, unit, ratio, "groups")
    for name in ("llama", "qwen2", "bert", "gpt2", "vit", "phi3")
    for unit, ratio in (("mlp_neurons", 0.5), ("heads", 0.5), ("hidden", 0.25))
] + [("llama", "heads", 0.5, "queries"), ("phi3", "heads", 0.5, "queries"), ("llama_eager", "heads", 0.5, "queries")]


@pytest.fixture(scope="module")
def captured():
    """Capture each case once; every test prunes its own deep copy."""
    cache = {}

    def get(name: str):
        if name not in cache:
            if name == "minilm":
                model = minilm()
                generator = torch.Generator().manual_seed(3)
                args, kwargs = (torch.randint(0, 30000, (2, 12), generator=generator),), {}
            else:
                model, args, kwargs = CASES[name].make()
            cache[name] = (surgeon_fx.capture(model, args, kwargs), args, kwargs)
        gm, args, kwargs = cache[name]
        return copy.deepcopy(gm), args, kwargs

    return get


def _state(gm):
    return gm.code, {k: v.clone() for k, v in gm.state_dict().items()}


def _assert_unchanged(gm, state):
    code, tensors = state
    assert gm.code == code
    current = gm.state_dict()
    assert sorted(current) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(current[name], tensor), name


def _num_params(gm) -> int:
    return sum(p.numel() for p in gm.parameters())


def _larger_input(args):
    x = args[0]
    if x.dtype == torch.long:
        generator = torch.Generator().manual_seed(5)
        return torch.randint(0, min(VOCAB, int(x.max()) + 1), (3, 13), generator=generator)
    return torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(5))


def _check_unit(captured, name, unit, ratio, gqa):
    plan = {"prune": [{"unit": unit, "ratio": ratio, "gqa": gqa}]}
    soft_gm, args, kwargs = captured(name)
    hard_gm, _, _ = captured(name)
    before = _state(soft_gm)
    selection = surgeon_fx.Plan.coerce(plan).resolve_prune(surgeon_fx.analyze(hard_gm))
    predicted = selection.num_params_after(hard_gm)

    surgeon_fx.compress(soft_gm, plan)
    surgeon_fx.compress(hard_gm, plan, hard=True)
    with torch.no_grad():
        soft = output_tensor(soft_gm(*args, **kwargs))
        hard = output_tensor(hard_gm(*args, **kwargs))
    kept = selection.kept_hidden()
    if kept is not None:
        removed = [i for i in range(soft.shape[-1]) if i not in set(kept)]
        assert torch.equal(soft[..., removed], torch.zeros_like(soft[..., removed]))
        soft = soft[..., kept]

    assert hard.shape == soft.shape
    torch.testing.assert_close(hard, soft, atol=TOLERANCE, rtol=0)
    assert _num_params(hard_gm) == predicted
    assert _num_params(hard_gm) < sum(v.numel() for v in before[1].values())
    hard_gm.graph.lint()
    soft_gm.graph.lint()

    surgeon_fx.restore(soft_gm)
    _assert_unchanged(soft_gm, before)
    return hard_gm, args


@pytest.mark.parametrize("name, unit, ratio, gqa", UNIT_CASES)
def test_prune_hard_matches_soft(name, unit, ratio, gqa, captured):
    hard_gm, args = _check_unit(captured, name, unit, ratio, gqa)

    larger = _larger_input(args)
    dims = {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} if larger.dim() == 2 else {0: torch.export.Dim.AUTO}
    program = torch.export.export(hard_gm, (larger,), dynamic_shapes=(dims,), strict=False)
    with torch.no_grad():
        direct = output_tensor(hard_gm(larger))
        exported = output_tensor(program.module()(larger))
    assert direct.shape[0] == 3
    torch.testing.assert_close(exported, direct, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("unit, ratio", [("mlp_neurons", 0.5), ("heads", 0.25), ("hidden", 0.1)])
def test_prune_minilm(unit, ratio, captured):
    hard_gm, args = _check_unit(captured, "minilm", unit, ratio, "groups")

    program = torch.export.export(hard_gm, args, dynamic_shapes=({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(program.module()(*args)), output_tensor(hard_gm(*args)), atol=TOLERANCE, rtol=0)


def test_hidden_prune_shrinks_llama_tensors(captured):
    gm, args, kwargs = captured("llama")
    surgeon_fx.compress(gm, {"prune": [{"unit": "hidden", "ratio": 0.25}]}, hard=True)

    assert gm.get_parameter("embed_tokens.weight").shape == (VOCAB, 48)
    assert gm.get_parameter("norm.weight").shape == (48,)
    assert gm.get_parameter("layers.1.post_attention_layernorm.weight").shape == (48,)
    assert gm.get_parameter("layers.0.self_attn.q_proj.weight").shape == (64, 48)
    assert gm.get_parameter("layers.0.mlp.down_proj.weight").shape == (48, 128)


def test_hidden_prune_shrinks_bert_tensors(captured):
    gm, args, kwargs = captured("bert")
    surgeon_fx.compress(gm, {"prune": [{"unit": "hidden", "ratio": 0.25}]}, hard=True)

    assert gm.get_parameter("embeddings.word_embeddings.weight").shape[1] == 48
    assert gm.get_parameter("embeddings.position_embeddings.weight").shape[1] == 48
    assert gm.get_parameter("embeddings.LayerNorm.bias").shape == (48,)
    assert gm.get_parameter("encoder.layer.1.output.LayerNorm.weight").shape == (48,)
    assert gm.get_parameter("pooler.dense.weight").shape == (64, 48)
    assert "[48]" in gm.code
    assert "[64]" not in gm.code


def test_gqa_groups_shrink_kv(captured):
    gm, args, kwargs = captured("llama")
    surgeon_fx.compress(gm, {"prune": [{"unit": "heads", "ratio": 0.5, "gqa": "groups"}]}, hard=True)

    assert gm.get_parameter("layers.0.self_attn.q_proj.weight").shape == (32, 64)
    assert gm.get_parameter("layers.0.self_attn.k_proj.weight").shape == (16, 64)
    assert gm.get_parameter("layers.0.self_attn.o_proj.weight").shape == (64, 32)


def test_gqa_queries_keep_kv(captured):
    gm, args, kwargs = captured("llama")
    surgeon_fx.compress(gm, {"prune": [{"unit": "heads", "ratio": 0.5, "gqa": "queries"}]}, hard=True)

    assert gm.get_parameter("layers.0.self_attn.q_proj.weight").shape == (32, 64)
    assert gm.get_parameter("layers.0.self_attn.k_proj.weight").shape == (32, 64)
    # expand [B, kv heads, queries per kv head, T, head_dim] now repeats each kv head once.
    assert ", 2, 1, sym_size" in gm.code


def test_round_to_keeps_multiple(captured):
    gm, args, kwargs = captured("llama")
    surgeon_fx.compress(gm, {"prune": [{"unit": "mlp_neurons", "ratio": 0.3, "round_to": 32}]}, hard=True)

    # 128 - round(0.3 * 128) = 90 neurons, rounded up to a multiple of 32.
    assert gm.get_parameter("layers.0.mlp.up_proj.weight").shape == (96, 64)
    assert gm.get_parameter("layers.0.mlp.down_proj.weight").shape == (64, 96)


def test_random_criterion_seeded(captured):
    gm, _, _ = captured("llama")
    analysis = surgeon_fx.analyze(gm)

    def kept(seed):
        rule = {"unit": "mlp_neurons", "ratio": 0.5, "criterion": "random", "seed": seed}
        selection = surgeon_fx.Plan.coerce({"prune": [rule]}).resolve_prune(analysis)
        return [a.kept for a in selection.actions]

    assert kept(1) == kept(1)
    assert kept(1) != kept(2)


def test_magnitude_keeps_largest_neurons(captured):
    gm, _, _ = captured("llama")
    with torch.no_grad():
        gm.get_parameter("layers.0.mlp.up_proj.weight")[:5] *= 100
    selection = surgeon_fx.Plan.coerce({"prune": [{"unit": "mlp_neurons", "ratio": 0.9}]}).resolve_prune(
        surgeon_fx.analyze(gm)
    )
    layer0 = next(a for a in selection.actions if a.group.layer == 0)

    assert layer0.kept[:5] == [0, 1, 2, 3, 4]


def test_soft_fine_tuning_keeps_pruned_channels_zero(captured):
    gm, args, kwargs = captured("llama")
    before = _state(gm)
    plan = {"prune": [{"unit": "hidden", "ratio": 0.25}, {"unit": "mlp_neurons", "ratio": 0.5}]}
    selection = surgeon_fx.Plan.coerce(plan).resolve_prune(surgeon_fx.analyze(gm))
    predicted = selection.num_params_after(gm)
    surgeon_fx.compress(gm, plan)
    removed = [i for i in range(64) if i not in set(selection.kept_hidden())]
    optimizer = torch.optim.AdamW(gm.parameters(), lr=1e-2, weight_decay=0.1)

    for _ in range(3):
        optimizer.zero_grad()
        output_tensor(gm(*args, **kwargs)).pow(2).mean().backward()
        optimizer.step()
    with torch.no_grad():
        output = output_tensor(gm(*args, **kwargs))

    assert torch.equal(output[..., removed], torch.zeros_like(output[..., removed]))
    assert gm.get_parameter("layers.0.mlp.up_proj.weight").shape == (64, 48)
    # Soft pruning stores compact tensors: no removed weight exists to be trained.
    assert _num_params(gm) == predicted
    surgeon_fx.restore(gm)
    _assert_unchanged(gm, before)


@pytest.mark.parametrize("hard", [False, True])
def test_prune_then_lrd_compose(hard, captured):
    gm, args, kwargs = captured("llama")
    before = _state(gm)
    plan = {"prune": [{"unit": "mlp_neurons", "ratio": 0.5}], "lrd": [{"roles": ["mlp_down"], "rank": 8}]}
    surgeon_fx.compress(gm, plan, hard=hard)
    down = gm.get_submodule("layers.0.mlp.down_proj")

    assert isinstance(down, LinearLRD)
    assert (down.in_features, down.out_features, down.rank) == (64, 64, 8)
    assert [e.pass_name for e in journal_of(gm).entries] == ["prune_channels", "decompose_linear"]
    if not hard:
        surgeon_fx.restore(gm)
        _assert_unchanged(gm, before)


def test_prune_lrd_hard_matches_soft(captured):
    plan = {"prune": [{"unit": "heads", "ratio": 0.5}], "lrd": [{"roles": ["q"], "rank": {"keep": 0.5}}]}
    soft_gm, args, kwargs = captured("bert")
    hard_gm, _, _ = captured("bert")
    surgeon_fx.compress(soft_gm, plan)
    surgeon_fx.compress(hard_gm, plan, hard=True)

    # keep 0.5 of the pruned 32x64 query projection: floor(0.5 * 32 * 64 / 96) = 10.
    assert hard_gm.get_submodule("encoder.layer.0.attention.self.query").rank == 10
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(hard_gm(*args)), output_tensor(soft_gm(*args)), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name, plan", [
    ("llama", {"prune": [{"unit": "mlp_neurons", "ratio": 0.5}, {"unit": "heads", "ratio": 0.5}],
               "lrd": [{"roles": ["mlp_down"], "rank": 8}]}),
    ("bert", {"prune": [{"unit": "hidden", "ratio": 0.25}, {"unit": "heads", "ratio": 0.25}]}),
])
def test_soft_to_hard_keeps_tensors(captured, name, plan):
    gm, args, kwargs = captured(name)
    surgeon_fx.compress(gm, plan)
    with torch.no_grad():  # simulates fine-tuning the soft model
        for parameter in gm.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)))
        soft = output_tensor(gm(*args, **kwargs))
    soft_params = sum(p.numel() for p in gm.parameters())

    surgeon_fx.compress(gm, plan, hard=True)
    with torch.no_grad():
        hard = output_tensor(gm(*args, **kwargs))
    if hard.shape != soft.shape:  # a pruned hidden size: soft has zeros in the removed channels
        soft = soft[..., soft.flatten(0, -2).abs().sum(0) != 0]
    torch.testing.assert_close(hard, soft, atol=1e-4, rtol=1e-4)
    assert not any("surgeon_fx_prune" in n for n, _ in gm.named_buffers())  # no gather or scatter left
    assert sum(p.numel() for p in gm.parameters()) == soft_params  # soft stored them compact already
    with pytest.raises(surgeon_fx.RestoreError):
        surgeon_fx.restore(gm)


def test_soft_to_hard_failure_keeps_soft(captured, monkeypatch):
    gm, args, kwargs = captured("llama")
    plan = {"prune": [{"unit": "mlp_neurons", "ratio": 0.5}]}
    surgeon_fx.compress(gm, plan)
    with torch.no_grad():
        for parameter in gm.parameters():
            parameter.mul_(1.01)  # simulates fine-tuning the soft model
    before = _state(gm)
    real_run = surgeon_fx.api._run_plan

    def fail_when_hard(gm, plan, hard, stats, calibration):
        real_run(gm, plan, hard, stats, calibration)
        if hard:
            raise surgeon_fx.RewriteError("injected failure")

    monkeypatch.setattr(surgeon_fx.api, "_run_plan", fail_when_hard)
    with pytest.raises(surgeon_fx.RewriteError, match="injected failure"):
        surgeon_fx.compress(gm, plan, hard=True)
    _assert_unchanged(gm, before)
    assert surgeon_fx.passes.journal_of(gm).state == "soft"


def test_soft_to_hard_activation_criterion(captured):
    gm, args, kwargs = captured("llama")
    plan = {"prune": [{"unit": "mlp_neurons", "ratio": 0.5, "criterion": "activation"}]}
    surgeon_fx.compress(gm, plan, calibration=[args])
    with torch.no_grad():
        soft = output_tensor(gm(*args, **kwargs))
    surgeon_fx.compress(gm, plan, hard=True)  # the statistics of the soft run select the same neurons
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(gm(*args, **kwargs)), soft, atol=TOLERANCE, rtol=0)


BAD_PLANS = [
    ("ratio_one", {"unit": "mlp_neurons", "ratio": 1.0}, "llama", r"ratio must be a number in \[0, 1\), got 1.0"),
    ("ratio_negative", {"unit": "heads", "ratio": -0.1}, "llama", r"ratio must be a number in \[0, 1\), got -0.1"),
    ("ratio_text", {"unit": "heads", "ratio": "half"}, "llama", r"got 'half'"),
    ("no_neurons_left", {"unit": "mlp_neurons", "ratio": 0.999}, "llama", r"leaves no neurons of the 128"),
    ("no_heads_left", {"unit": "heads", "ratio": 0.9}, "bert", r"leaves no heads of the 4 .* at most 0.75"),
    ("no_channels_left", {"unit": "hidden", "ratio": 0.995}, "bert", r"leaves no channels of the 64"),
    ("gqa_groups_ratio", {"unit": "heads", "ratio": 0.25}, "llama",
     r"ratio 0.25 cannot be met .* ratios that can: \[0.0, 0.5\]"),
    ("gqa_queries_ratio", {"unit": "heads", "ratio": 0.75, "gqa": "queries"}, "llama",
     r"ratios that can: \[0.0, 0.5\]"),
    ("excluded_mlp_site", {"unit": "mlp_neurons", "ratio": 0.5, "roles": ["mlp_up"]}, "llama",
     r"excludes the coupled sites \['layers.0.mlp.gate_proj', 'layers.0.mlp.down_proj'\]"),
    ("excluded_head_site", {"unit": "heads", "ratio": 0.5, "roles": ["q", "k", "v"]}, "llama",
     r"excludes the coupled sites \['layers.0.self_attn.o_proj'\]"),
    ("hidden_one_layer", {"unit": "hidden", "ratio": 0.5, "layers": [0]}, "llama",
     r"excludes the coupled sites \[.*'layers.1.self_attn.q_proj'"),
    ("no_match", {"unit": "heads", "ratio": 0.5, "paths": ["decoder.*"]}, "llama", r"matches no heads group"),
    ("unknown_unit", {"unit": "channels", "ratio": 0.5}, "llama", r"unit 'channels'; choose one of"),
    ("unknown_gqa", {"unit": "heads", "ratio": 0.5, "gqa": "kv"}, "llama", r"gqa 'kv'"),
    ("bad_round_to", {"unit": "hidden", "ratio": 0.5, "round_to": 0}, "llama", r"round_to must be a positive int"),
]


@pytest.mark.parametrize("label, rule, name, message", BAD_PLANS, ids=[p[0] for p in BAD_PLANS])
def test_bad_prune_rule_changes_nothing(label, rule, name, message, captured):
    gm, _, _ = captured(name)
    before = _state(gm)

    with pytest.raises(PlanError, match=message):
        surgeon_fx.compress(gm, {"prune": [rule], "lrd": [{"roles": ["mlp_down"], "rank": 4}]}, hard=True)
    _assert_unchanged(gm, before)
    assert journal_of(gm).state == "none"


def test_lrd_rank_too_large_after_prune(captured):
    gm, _, _ = captured("llama")
    before = _state(gm)
    plan = {"prune": [{"unit": "heads", "ratio": 0.5}], "lrd": [{"roles": ["q"], "rank": 40}]}

    with pytest.raises(PlanError, match=r"rank 40 exceeds .* = 32 at layers.0.self_attn.q_proj"):
        surgeon_fx.compress(gm, plan)
    _assert_unchanged(gm, before)


def test_failed_prune_rolls_back(captured, monkeypatch):
    from surgeon_fx.passes import prune_channels

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure after the tensors were swapped")

    gm, _, _ = captured("llama")
    before = _state(gm)
    monkeypatch.setattr(prune_channels, "_insert_soft_nodes", fail)

    with pytest.raises(surgeon_fx.RewriteError, match="injected failure"):
        surgeon_fx.compress(gm, {"prune": [{"unit": "hidden", "ratio": 0.5}]})
    _assert_unchanged(gm, before)
    assert journal_of(gm).state == "none"
