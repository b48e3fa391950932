"""The torch.compile backend: compressed Dynamo graphs match compress on a captured graph."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import surgeon_fx
import surgeon_fx.layers
from models import CASES, VOCAB, output_tensor
from surgeon_fx import PlanError, SurgeonError, SurgeonWarning

# Many small SVDs: one thread avoids oversubscribing a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("torch_single_thread")

PLAN = {
    "lrd": [
        {"roles": ["q", "attn_out", "mlp_down"], "rank": 8},
        {"roles": ["mlp_up"], "layers": [1], "rank": {"keep": 0.5}},
    ]
}
# Rules by role only: every block gets the same ranks.
UNIFORM_PLAN = {"lrd": [{"roles": ["q", "attn_out", "mlp_down"], "rank": 8}]}
PRUNE_PLANS = {
    "mlp_neurons": {"prune": [{"unit": "mlp_neurons", "ratio": 0.5}]},
    "heads": {"prune": [{"unit": "heads", "ratio": 0.5}]},
    "prune_and_lrd": {"prune": [{"unit": "mlp_neurons", "ratio": 0.25}], "lrd": [{"roles": ["attn_out"], "rank": 8}]},
}
# Decomposition and pruning on different sites, in one compilation.
INDUCTOR_PLAN = {"lrd": [{"roles": ["q", "attn_out"], "rank": 8}], "prune": [{"unit": "mlp_neurons", "ratio": 0.5}]}
TOLERANCE = 1e-4


class GraphBreakAfter(nn.Module):
    """Run a block, then force Dynamo to end its graph."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        output = self.block(*args, **kwargs)
        torch._dynamo.graph_break()
        return output


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _blocks(model: nn.Module) -> nn.ModuleList:
    return model.layers if hasattr(model, "layers") else model.encoder.layer


def _with_graph_breaks(model: nn.Module) -> nn.Module:
    blocks = _blocks(model)
    for index, block in enumerate(blocks):
        blocks[index] = GraphBreakAfter(block)
    return model


def _reference(model: nn.Module, args: tuple, plan=PLAN) -> tuple[torch.Tensor, list[str]]:
    """Return the output of compress() on the captured graph and the paths it rewrote."""
    gm = surgeon_fx.capture(model, args)
    surgeon_fx.compress(gm, plan)
    with torch.no_grad():
        output = output_tensor(gm(*args))
    paths = sorted(r["path"] for r in gm.meta["surgeon_fx"].rewrites)
    return output, paths


def _compiled_output(model, args, compiler) -> torch.Tensor:
    compiled = torch.compile(model, backend=compiler)
    with torch.no_grad():
        return output_tensor(compiled(*args))


def _compressed_paths(compiler) -> list[str]:
    return sorted({path for report in compiler.reports for path in report.sites})


def _causes(error: BaseException) -> list[BaseException]:
    """Return ``error`` and its chain of causes, through Dynamo's wrapper."""
    causes = []
    while error is not None:
        causes.append(error)
        error = error.__cause__ or getattr(error, "inner_exception", None)
    return causes


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_eager_inner_matches_compress(name):
    model, args, _ = CASES[name].make()
    expected, expected_paths = _reference(model, args)
    compiler = surgeon_fx.backend(PLAN, inner="eager")

    output = _compiled_output(model, args, compiler)

    assert (output - expected).abs().max().item() <= TOLERANCE
    assert _compressed_paths(compiler) == expected_paths
    assert len(expected_paths) == 7  # 2 layers x (q, attn_out, mlp_down) + layer 1 mlp_up
    compiler.check()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_inductor_inner_matches_compress(name):
    model, args, _ = CASES[name].make()
    expected, _ = _reference(model, args, INDUCTOR_PLAN)
    compiler = surgeon_fx.backend(INDUCTOR_PLAN, inner="inductor")

    output = _compiled_output(model, args, compiler)

    assert (output - expected).abs().max().item() <= TOLERANCE
    assert len(compiler.reports[0].sites) == 4  # q and attn_out of 2 layers
    assert len(compiler.reports[0].pruned) == (4 if name == "bert" else 6)  # up, gate (Llama), down


def test_callable_inner_receives_factor_inputs():
    model, args, _ = CASES["llama"].make()
    received = []

    def inner(gm, example_inputs):
        received.append((gm, example_inputs))
        return gm.forward

    _compiled_output(model, args, surgeon_fx.backend(PLAN, inner=inner))

    assert len(received) == 1
    gm, example_inputs = received[0]
    gm.graph.lint()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    factor_names = [n.name for n in placeholders if n.name.startswith("surgeon_fx_")]
    assert factor_names[:2] == ["surgeon_fx_v_0", "surgeon_fx_u_0"]
    assert len(factor_names) == 14  # v and u for 7 sites
    assert placeholders[-14:] == [n for n in placeholders if n.name in factor_names]
    assert len(example_inputs) == len(placeholders)
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear]
    assert len(linears) == 14 + 7  # each compressed site calls linear twice
    v_0 = example_inputs[len(placeholders) - 14]
    assert tuple(v_0.shape) == (8, 64)  # (rank, in_features) of layers.0.self_attn.q_proj


@pytest.mark.parametrize("name", ["llama", "bert"])
@pytest.mark.parametrize("pass_model", [True, False])
def test_graph_breaks_compress_every_site(name, pass_model):
    model, args, _ = CASES[name].make()
    model = _with_graph_breaks(model)
    expected, expected_paths = _reference(model, args, UNIFORM_PLAN)
    compiler = surgeon_fx.backend(UNIFORM_PLAN, inner="eager", model=model if pass_model else None)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SurgeonWarning)
        output = _compiled_output(model, args, compiler)

    assert len([r for r in compiler.reports if r.linear_sites]) >= 2
    assert (output - expected).abs().max().item() <= TOLERANCE
    assert len(expected_paths) == 6
    # One factorisation per selected weight, also where Dynamo reused block 0's graph.
    assert compiler.cache.computed == 6
    if pass_model and name == "llama":
        # Llama guards on each attention's layer_idx, so Dynamo compiles every block.
        assert _compressed_paths(compiler) == expected_paths
    compiler.check()


def test_graph_breaks_layer_rules_llama():
    model, args, _ = CASES["llama"].make()
    model = _with_graph_breaks(model)
    expected, expected_paths = _reference(model, args)
    compiler = surgeon_fx.backend(PLAN, inner="eager", model=model)

    output = _compiled_output(model, args, compiler)

    assert (output - expected).abs().max().item() <= TOLERANCE
    assert _compressed_paths(compiler) == expected_paths


def test_reused_graph_with_other_ranks_runs_variant():
    # BERT blocks carry no per-layer constant, so Dynamo runs the graph compiled
    # for block 0 with the weights of block 1, for which PLAN has another rule.
    model, args, _ = CASES["bert"].make()
    model = _with_graph_breaks(model)
    expected, _ = _reference(model, args)
    compiler = surgeon_fx.backend(PLAN, inner="eager", model=model)

    with pytest.warns(SurgeonWarning, match="encoder.layer.1.block.attention.self.query"):
        output = _compiled_output(model, args, compiler)

    assert (output - expected).abs().max().item() <= TOLERANCE
    assert compiler.cache.computed == 7


def test_reused_graph_without_model_raises():
    model, args, _ = CASES["bert"].make()
    model = _with_graph_breaks(model)
    compiler = surgeon_fx.backend(PLAN, inner="eager")

    with pytest.raises(SurgeonError, match="Dynamo reused the graph compiled for.*Pass model="):
        _compiled_output(model, args, compiler)


def test_graph_breaks_without_model_warn():
    model, args, _ = CASES["llama"].make()
    model = _with_graph_breaks(model)
    compiler = surgeon_fx.backend(UNIFORM_PLAN, inner="eager")

    with pytest.warns(SurgeonWarning, match="Pass model="):
        _compiled_output(model, args, compiler)


def test_recompilation_reuses_factors(monkeypatch):
    calls = []
    svd = surgeon_fx.layers.truncated_svd

    def counting_svd(weight, rank):
        calls.append(tuple(weight.shape))
        return svd(weight, rank)

    monkeypatch.setattr(surgeon_fx.layers, "truncated_svd", counting_svd)
    model, args, _ = CASES["llama"].make()
    compiler = surgeon_fx.backend(PLAN, inner="eager")
    compiled = torch.compile(model, backend=compiler)
    new_shape = torch.randint(0, VOCAB, (3, 13), generator=torch.Generator().manual_seed(2))

    with torch.no_grad():
        compiled(*args)
        first = len(calls)
        output = output_tensor(compiled(new_shape))

    assert len(compiler.reports) == 2  # the new input shape made Dynamo recompile
    assert first == 7
    assert len(calls) == 7
    assert compiler.cache.computed == 7
    gm = surgeon_fx.capture(model, args)
    surgeon_fx.compress(gm, PLAN)
    with torch.no_grad():
        assert (output - output_tensor(gm(new_shape))).abs().max().item() <= TOLERANCE


def test_changed_weight_recomputes_factors():
    model, args, _ = CASES["llama"].make()
    compiler = surgeon_fx.backend(PLAN, inner="eager")
    compiled = torch.compile(model, backend=compiler)
    with torch.no_grad():
        compiled(*args)
        model.layers[0].mlp.down_proj.weight.mul_(2.0)
        output = output_tensor(compiled(*args))

    assert len(compiler.reports) == 1  # no recompilation: the wrapper saw the new version
    assert compiler.cache.computed == 8  # 7 first, then the changed weight again
    expected, _ = _reference(model, args)
    assert (output - expected).abs().max().item() <= TOLERANCE


def test_model_parameters_unchanged():
    model, args, _ = CASES["bert"].make()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    _compiled_output(model, args, surgeon_fx.backend(PLAN, inner="eager"))

    after = dict(model.named_parameters())
    assert sorted(after) == sorted(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def test_logs_compressed_sites(caplog):
    model, args, _ = CASES["llama"].make()

    with caplog.at_level(logging.INFO, logger="surgeon_fx.backend"):
        _compiled_output(model, args, surgeon_fx.backend(PLAN, inner="eager"))

    messages = [r.getMessage() for r in caplog.records if r.name == "surgeon_fx.backend"]
    assert len(messages) == 1
    assert "compressed 7 and pruned 0 of 14 linear sites" in messages[0]
    assert "layers.1.mlp.up_proj (rank" in messages[0]
    assert " ms" in messages[0]


def test_unmatched_rule_fails_check():
    model, args, _ = CASES["llama"].make()
    plan = {"lrd": [{"roles": ["mlp_down"], "rank": 8}, {"paths": ["decoder.*"], "rank": 4}]}
    compiler = surgeon_fx.backend(plan, inner="eager")

    _compiled_output(model, args, compiler)

    assert compiler.unmatched_rules == ["lrd 1"]
    with pytest.raises(PlanError, match=r"lrd rule 1 \{'paths': \['decoder\.\*'\]\}"):
        compiler.check()


def test_check_before_compile_fails():
    with pytest.raises(PlanError, match="no graph yet"):
        surgeon_fx.backend(PLAN, inner="eager").check()


def test_rank_too_large_fails_compile():
    model, args, _ = CASES["llama"].make()
    compiler = surgeon_fx.backend({"lrd": [{"roles": ["k"], "rank": 40}]}, inner="eager")

    with pytest.raises(Exception) as caught:
        _compiled_output(model, args, compiler)

    causes = _causes(caught.value)
    plan_errors = [e for e in causes if isinstance(e, PlanError)]
    assert plan_errors, f"no PlanError among {[type(e).__name__ for e in causes]}"
    assert "layers.0.self_attn.k_proj" in str(plan_errors[0])
    assert "40" in str(plan_errors[0])


@pytest.mark.parametrize("name", ["llama", "bert"])
@pytest.mark.parametrize("plan_name", sorted(PRUNE_PLANS))
def test_prune_matches_hard_compress(name, plan_name):
    plan = PRUNE_PLANS[plan_name]
    model, args, _ = CASES[name].make()
    gm = surgeon_fx.capture(model, args)
    surgeon_fx.compress(gm, plan, hard=True)
    with torch.no_grad():
        expected = output_tensor(gm(*args))
    pruned_paths = sorted({r["path"] for r in gm.meta["surgeon_fx"].rewrites if r["method"].startswith("prune")})
    compiler = surgeon_fx.backend(plan, inner="eager")

    output = _compiled_output(model, args, compiler)

    assert (output - expected).abs().max().item() <= TOLERANCE
    assert sorted(compiler.reports[0].pruned) == pruned_paths
    compiler.check()


def test_prune_in_reused_graph_uses_own_channels():
    # Dynamo runs block 0's graph for block 1 too; block 1 keeps other neurons.
    plan = PRUNE_PLANS["mlp_neurons"]
    model, args, _ = CASES["bert"].make()
    model = _with_graph_breaks(model)
    gm = surgeon_fx.capture(model, args)
    surgeon_fx.compress(gm, plan, hard=True)
    with torch.no_grad():
        expected = output_tensor(gm(*args))
    compiler = surgeon_fx.backend(plan, inner="eager")

    output = _compiled_output(model, args, compiler)

    assert len([r for r in compiler.reports if r.pruned]) == 1  # one graph serves both blocks
    assert (output - expected).abs().max().item() <= TOLERANCE


def test_prune_hidden_rejected():
    plan = {"prune": [{"unit": "hidden", "ratio": 0.25}]}

    with pytest.raises(PlanError, match="prune rule 0 prunes unit 'hidden'"):
        surgeon_fx.backend(plan, inner="eager")


def test_prune_activation_criterion_rejected():
    plan = {"prune": [{"unit": "mlp_neurons", "ratio": 0.5, "criterion": "activation"}]}

    with pytest.raises(PlanError, match="prune rule 0 uses criterion 'activation'"):
        surgeon_fx.backend(plan, inner="eager")


def test_prune_and_lrd_same_site_fails():
    plan = {"prune": [{"unit": "mlp_neurons", "ratio": 0.5}], "lrd": [{"roles": ["mlp_down"], "rank": 8}]}
    model, args, _ = CASES["llama"].make()

    with pytest.raises(Exception) as caught:
        _compiled_output(model, args, surgeon_fx.backend(plan, inner="eager"))

    plan_errors = [e for e in _causes(caught.value) if isinstance(e, PlanError)]
    assert plan_errors
    assert "layers.0.mlp.down_proj" in str(plan_errors[0])
    assert "both prune and lrd rules" in str(plan_errors[0])


def test_calibrated_method_rejected():
    plan = {"lrd": [{"roles": ["mlp_down"], "rank": 8, "method": "svd-llm"}]}

    with pytest.raises(PlanError, match="lrd rule 0 uses method 'svd-llm'"):
        surgeon_fx.backend(plan, inner="eager")


def test_unknown_inner_backend_rejected():
    with pytest.raises(SurgeonError, match="inner backend 'no-such-backend' is not registered"):
        surgeon_fx.backend(PLAN, inner="no-such-backend")


def test_full_rank_rule_leaves_graph_dense():
    model, args, _ = CASES["bert"].make()
    compiler = surgeon_fx.backend({"lrd": [{"roles": ["mlp_down"], "rank": "full"}]}, inner="eager")
    with torch.no_grad():
        dense = output_tensor(model(*args))

    with warnings.catch_warnings():
        warnings.simplefilter("error", SurgeonWarning)
        output = _compiled_output(model, args, compiler)

    assert compiler.reports[0].sites == []
    assert torch.equal(output, dense)
