"""Tests for calibration, the activation-aware LRD methods and budget allocation.

Each method is checked against a direct computation of its definition on small
matrices. Calibration statistics are checked against the inputs that forward hooks
on the eager model see, and budgets against the parameter count they promise.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import surgeon_fx
from models import CASES, VOCAB
from surgeon_fx import PlanError, SurgeonError
from surgeon_fx.budget import allocate_ranks
from surgeon_fx.calibration import CalibrationStats, SiteStats, calibrate
from surgeon_fx import lrd_methods
from surgeon_fx.passes import journal_of
from surgeon_fx.report import rewrites

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def random_inputs(tokens: int, channels: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Correlated, unevenly scaled channels, as activations are.
    mixing = torch.randn(channels, channels, generator=generator, dtype=torch.float64)
    scales = torch.logspace(-1, 1, channels, dtype=torch.float64)
    return torch.randn(tokens, channels, generator=generator, dtype=torch.float64) @ mixing * scales


def output_error(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> float:
    """Return ``||(W - UV) X^T||_F``, the error on the calibration inputs."""
    return float(((weight - u @ v) @ x.T).norm())


def stats_of(x: torch.Tensor) -> SiteStats:
    stats = SiteStats.empty(x.shape[1])
    stats.add(x)
    return stats


# ---------------------------------------------------------------- statistics


def test_site_stats_match_direct_sums():
    x = random_inputs(50, 6, seed=0)
    stats = SiteStats.empty(6)
    stats.add(x[:20])
    stats.add(x[20:])
    torch.testing.assert_close(stats.xtx, x.T @ x)
    torch.testing.assert_close(stats.channel_norms, x.norm(dim=0))
    torch.testing.assert_close(stats.mean_abs, x.abs().mean(0))
    assert stats.tokens == 50


@pytest.fixture(scope="module")
def llama_model():
    model, _, _ = CASES["llama"].make()
    return model


@pytest.fixture
def llama(llama_model):
    """A fresh capture of the tiny Llama, with a batch whose second row is padded."""
    model = llama_model
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 8), generator=generator)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # the second sentence is padded after 5 tokens
    batch = {"input_ids": ids, "attention_mask": mask}
    gm = surgeon_fx.capture(model, kwargs=batch)
    return model, gm, batch


def test_calibrate_matches_eager_inputs(llama):
    model, gm, batch = llama
    analysis = surgeon_fx.analyze(gm)
    sites = [analysis.site("layers.1.mlp.down_proj"), analysis.site("layers.0.self_attn.q_proj")]
    seen = {}
    hooks = [
        model.get_submodule(site.path).register_forward_pre_hook(
            lambda module, args, path=site.path: seen.__setitem__(path, args[0].detach())
        )
        for site in sites
    ]
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    code = gm.code

    stats = calibrate(gm, [batch, batch], sites)

    keep = batch["attention_mask"].reshape(-1).bool()
    for site in sites:
        rows = seen[site.path].reshape(-1, site.in_features)[keep].to(torch.float64)
        torch.testing.assert_close(stats[site.path].xtx, 2 * rows.T @ rows, rtol=1e-5, atol=1e-6)
        assert stats[site.path].tokens == 2 * 13
    assert gm.code == code


def test_calibration_progress_reports_batches(llama):
    _, gm, batch = llama
    site = surgeon_fx.analyze(gm).site("layers.0.mlp.up_proj")
    done = []
    calibrate(gm, [batch] * 3, [site], progress=done.append)
    assert done == [1, 2, 3]


def test_stats_save_load_round_trip(tmp_path, llama):
    _, gm, batch = llama
    sites = surgeon_fx.analyze(gm).sites_with_role("k", "mlp_down")
    stats = calibrate(gm, [batch], sites)
    stats.save(tmp_path / "stats.safetensors")
    loaded = CalibrationStats.load(tmp_path / "stats.safetensors")
    assert loaded.keys() == stats.keys()
    for path in stats:
        assert torch.equal(loaded[path].xtx, stats[path].xtx)
        assert loaded[path].tokens == stats[path].tokens


def test_stats_load_truncated_file(tmp_path, llama):
    _, gm, batch = llama
    stats = calibrate(gm, [batch], surgeon_fx.analyze(gm).sites_with_role("k"))
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SurgeonError, match="cannot read calibration statistics"):
        CalibrationStats.load(path)


# ---------------------------------------------------------------- methods


def test_svd_llm_matches_definition():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    x = random_inputs(40, 5, seed=1)
    stats = stats_of(x)
    s, s_inv = lrd_methods.whitening(stats.covariance)

    covariance = x.T @ x / 40
    damped = covariance + lrd_methods.DAMPING * covariance.diagonal().mean() * torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(s @ s.T, damped)
    torch.testing.assert_close(s @ s_inv, torch.eye(5, dtype=torch.float64))

    u, v = lrd_methods.factor(weight, 2, (s, s_inv))
    left, values, right = torch.linalg.svd(weight @ torch.linalg.cholesky(damped), full_matrices=False)
    expected = left[:, :2] @ torch.diag(values[:2]) @ right[:2] @ torch.linalg.inv(torch.linalg.cholesky(damped))
    torch.testing.assert_close(u @ v, expected)


def test_asvd_matches_definition():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    x = random_inputs(30, 4, seed=2)
    transform = lrd_methods.input_transform("asvd", stats_of(x), 4)
    u, v = lrd_methods.factor(weight, 2, transform)

    scale = x.abs().mean(0) ** lrd_methods.ASVD_ALPHA
    left, values, right = torch.linalg.svd(weight * scale, full_matrices=False)
    expected = (left[:, :2] * values[:2]) @ right[:2] / scale
    torch.testing.assert_close(u @ v, expected)


def test_whitening_falls_back_to_eigh(monkeypatch):
    monkeypatch.setattr(lrd_methods, "DAMPING", 0.0)
    covariance = torch.diag(torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64))  # singular
    s, s_inv = lrd_methods.whitening(covariance)
    assert torch.isfinite(s_inv).all()
    torch.testing.assert_close(s @ s_inv, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close((s @ s.T).diagonal()[[0, 2]], torch.tensor([2.0, 1.0], dtype=torch.float64))


@settings(max_examples=25, deadline=None)
@given(
    out_features=st.integers(2, 10),
    in_features=st.integers(2, 10),
    seed=st.integers(0, 10_000),
)
def test_svd_llm_beats_svd_at_every_rank(out_features, in_features, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    x = random_inputs(4 * in_features, in_features, seed)
    stats = stats_of(x)
    whitened = lrd_methods.input_transform("svd-llm", stats, in_features)
    for rank in range(1, min(out_features, in_features) + 1):
        plain = output_error(weight, *lrd_methods.factor(weight, rank, None), x)
        aware = output_error(weight, *lrd_methods.factor(weight, rank, whitened), x)
        # Damping moves the optimum slightly off the undamped error; 1% slack covers it.
        assert aware <= plain * 1.01 + 1e-9, f"rank {rank}: svd-llm {aware} > svd {plain}"


# ---------------------------------------------------------------- budgets


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_budget_meets_target(llama, fraction):
    _, gm, batch = llama
    roles = ["q", "k", "v", "attn_out", "mlp_gate", "mlp_up", "mlp_down"]
    analysis = surgeon_fx.analyze(gm)
    selected = analysis.sites_with_role(*roles)
    total = sum(s.in_features * s.out_features for s in selected)
    plan = {"lrd": [{"roles": roles, "budget": {"params": fraction}, "method": "svd-llm"}]}
    actions = surgeon_fx.Plan.from_dict(plan).resolve_lrd(analysis, stats=calibrate(gm, [batch], selected))

    kept = 0
    for action in actions:
        site = action.site
        width = site.in_features + site.out_features
        kept += site.in_features * site.out_features if action.rank is None else action.rank * width
    largest_step = max(s.in_features + s.out_features for s in selected)
    assert kept <= fraction * total
    assert kept > fraction * total - largest_step


def test_budget_prefers_low_error_sites():
    # Two sites of the same shape: one nearly rank 1, one with a flat spectrum.
    site_a = surgeon_fx.LinearSite(path="a", node=None, input=None, in_features=8, out_features=8)
    site_b = surgeon_fx.LinearSite(path="b", node=None, input=None, in_features=8, out_features=8)
    steep = torch.tensor([10.0, 0.1, 0.1, 0.1], dtype=torch.float64)
    flat = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    ranks = allocate_ranks([site_a, site_b], [steep, flat], 0.5, "test")
    assert ranks[site_a] == 1
    assert ranks[site_b] == 3


# ---------------------------------------------------------------- compress with calibration


def test_compress_svd_llm_restores_bit_exact(llama):
    _, gm, batch = llama
    code = gm.code
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    plan = {"lrd": [{"roles": ["mlp_up", "mlp_down"], "rank": 8, "method": "svd-llm"}]}
    surgeon_fx.compress(gm, plan, calibration=[batch])
    rows = rewrites(gm)
    assert {row["method"] for row in rows} == {"lrd:svd-llm"}
    assert torch.isfinite(gm(**batch).last_hidden_state).all()
    surgeon_fx.restore(gm)
    assert gm.code == code
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_sequential_journals_each_layer(llama):
    _, gm, batch = llama
    code = gm.code
    plan = {"sequential": True, "lrd": [{"roles": ["mlp_down", "attn_out"], "rank": 8, "method": "svd-llm"}]}
    surgeon_fx.compress(gm, plan, calibration=[batch])
    entries = journal_of(gm).entries
    assert [e.pass_name for e in entries] == ["decompose_linear[layer 0]", "decompose_linear[layer 1]"]
    surgeon_fx.restore(gm)
    assert gm.code == code


def test_sequential_live_matches_graph(llama):
    """compress_model runs a sequential plan layer by layer too, with hooks on the live modules."""
    model, gm, batch = llama
    plan = {"sequential": True, "lrd": [{"roles": ["mlp_down", "attn_out"], "rank": 8, "method": "svd-llm"}]}
    surgeon_fx.compress(gm, plan, calibration=[batch])
    expected = gm(**batch)[0]
    surgeon_fx.restore(gm)
    live = copy.deepcopy(model)
    surgeon_fx.compress_model(live, plan, kwargs=batch, calibration=[batch])
    with torch.no_grad():
        torch.testing.assert_close(live(**batch).last_hidden_state, expected, atol=1e-5, rtol=1e-4)
        one_pass = copy.deepcopy(model)
        surgeon_fx.compress_model(one_pass, {"lrd": plan["lrd"]}, kwargs=batch, calibration=[batch])
        assert not torch.allclose(one_pass(**batch).last_hidden_state, expected, atol=1e-5, rtol=1e-4)


def test_sequential_live_failure_restores(llama, monkeypatch):
    model, _, batch = llama
    live = copy.deepcopy(model)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    calls = []

    def calibrate_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the plan's statistics, layer 0, then layer 1 after layer 0 was swapped in
            raise SurgeonError("injected failure")
        return calibrate(*args, **kwargs)

    monkeypatch.setattr(surgeon_fx.live, "calibrate", calibrate_then_fail)
    plan = {"sequential": True, "lrd": [{"roles": ["mlp_down"], "rank": 8, "method": "svd-llm"}]}
    with pytest.raises(SurgeonError, match="injected failure"):
        surgeon_fx.compress_model(live, plan, kwargs=batch, calibration=[batch])
    assert len(calls) == 3
    assert type(live.layers[0].mlp.down_proj) is torch.nn.Linear
    assert all(torch.equal(before[k], v) for k, v in live.state_dict().items())
    assert surgeon_fx.live.journal_of_model(live) is None


BAD_CALIBRATION = [
    ("empty", {"lrd": [{"rank": 4, "method": "svd-llm"}]}, [], "calibration set is empty"),
    ("wrong keys", {"lrd": [{"rank": 4, "method": "svd-llm"}]}, [{"pixel_values": torch.zeros(1, 3)}],
     "calibration batch 0 does not fit"),
    ("no calibration", {"lrd": [{"rank": 4, "method": "asvd"}]}, None, "needs calibration"),
    ("budget zero", {"lrd": [{"budget": {"params": 0.0}}]}, None, r"must be in \(0, 1\], got 0.0"),
    ("budget above one", {"lrd": [{"budget": {"flops": 1.5}}]}, None, r"must be in \(0, 1\], got 1.5"),
    ("sequential without data", {"sequential": True, "lrd": [{"rank": 4}]}, None, "sequential plan needs"),
    ("sequential with pruning", {"sequential": True, "lrd": [{"rank": 4}], "prune": [{"unit": "heads", "ratio": 0.5}]},
     None, "applies to plans with lrd rules only"),
]


@pytest.mark.parametrize("name,plan,calibration,message", BAD_CALIBRATION, ids=[c[0] for c in BAD_CALIBRATION])
def test_bad_calibration_changes_nothing(llama, name, plan, calibration, message):
    _, gm, _ = llama
    code = gm.code
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(PlanError, match=message):
        surgeon_fx.compress(gm, plan, calibration=calibration)
    assert gm.code == code
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    assert journal_of(gm).state == "none"


def test_budget_rejects_non_finite_weight(llama):
    _, gm, _ = llama
    analysis = surgeon_fx.analyze(gm)
    weight = analysis.site("layers.1.mlp.up_proj").weight(gm)
    original = weight[2, 3].item()
    with torch.no_grad():
        weight[2, 3] = float("inf")
    try:
        with pytest.raises(PlanError, match=r"layers.1.mlp.up_proj has 1 non-finite values, the first inf"):
            surgeon_fx.compress(gm, {"lrd": [{"roles": ["mlp_up"], "budget": {"params": 0.5}}]})
        assert journal_of(gm).state == "none"
    finally:
        with torch.no_grad():
            weight[2, 3] = original


# ---------------------------------------------------------------- activation pruning


def test_activation_pruning_keeps_wanda_top_neurons(llama):
    _, gm, batch = llama
    analysis = surgeon_fx.analyze(gm)
    names = ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj"]
    gate, up, down = (analysis.site(name) for name in names)
    stats = calibrate(gm, [batch], [gate, up, down])

    # Wanda: |W_ij| * ||X_j||, summed in squares over every weight of neuron u.
    def scaled(site):
        return site.weight(gm).detach().double() * stats[site.path].channel_norms

    score = scaled(gate).pow(2).sum(1) + scaled(up).pow(2).sum(1) + scaled(down).pow(2).sum(0)
    expected = sorted(score.argsort(descending=True)[:64].tolist())

    plan = {"prune": [{"unit": "mlp_neurons", "ratio": 0.5, "layers": [0], "criterion": "activation"}]}
    selection = surgeon_fx.Plan.from_dict(plan).resolve_prune(analysis, stats)
    (action,) = selection.actions
    assert action.kept == expected


def test_activation_pruning_differs_from_magnitude(llama):
    _, gm, batch = llama
    analysis = surgeon_fx.analyze(gm)
    stats = calibrate(gm, [batch], analysis.sites)
    kept = {}
    for criterion in ("magnitude", "activation"):
        plan = {"prune": [{"unit": "mlp_neurons", "ratio": 0.5, "criterion": criterion}]}
        selection = surgeon_fx.Plan.from_dict(plan).resolve_prune(analysis, stats)
        kept[criterion] = [a.kept for a in selection.actions]
    assert kept["magnitude"] != kept["activation"]


def test_activation_pruning_compress_and_restore(llama):
    _, gm, batch = llama
    code = gm.code
    plan = {"prune": [{"unit": "heads", "ratio": 0.5, "criterion": "activation"}]}
    surgeon_fx.compress(gm, plan, calibration=[batch])
    assert torch.isfinite(gm(**batch).last_hidden_state).all()
    surgeon_fx.restore(gm)
    assert gm.code == code


def test_activation_pruning_needs_calibration(llama):
    _, gm, _ = llama
    code = gm.code
    plan = {"prune": [{"unit": "mlp_neurons", "ratio": 0.5, "criterion": "activation"}]}
    with pytest.raises(PlanError, match="criterion 'activation', which needs calibration"):
        surgeon_fx.compress(gm, plan)
    assert gm.code == code
    assert journal_of(gm).state == "none"


def test_prune_then_svd_llm_on_pruned_sites(llama):
    _, gm, batch = llama
    code = gm.code
    plan = {
        "prune": [{"unit": "mlp_neurons", "ratio": 0.5, "criterion": "activation"}],
        "lrd": [{"roles": ["mlp_down", "mlp_up"], "rank": 16}],
    }
    surgeon_fx.compress(gm, plan, calibration=[batch])
    methods = {r["method"] for r in rewrites(gm) if r["role"] == "mlp_down"}
    assert "lrd:svd-llm" in methods
    assert "lrd:svd" not in methods
    soft = gm(**batch).last_hidden_state
    assert torch.isfinite(soft).all()
    surgeon_fx.restore(gm)
    assert gm.code == code


def test_restricted_stats_match_kept_channels():
    x = random_inputs(30, 6, seed=4)
    kept = [0, 2, 5]
    restricted = stats_of(x).restrict(kept)
    direct = stats_of(x[:, kept])
    torch.testing.assert_close(restricted.xtx, direct.xtx)
    torch.testing.assert_close(restricted.channel_norms, direct.channel_norms)
    assert restricted.tokens == direct.tokens
