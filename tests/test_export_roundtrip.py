"""Compressed graph modules export again, save, load, and give the same outputs."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

import surgeon_fx
from models import CASES, VOCAB, output_tensor

# Many small SVDs: one thread avoids oversubscribing a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("torch_single_thread")

PLANS = {
    "lrd": {"lrd": [{"roles": ["q", "attn_out", "mlp_down"], "rank": 8}, {"roles": ["mlp_up"], "rank": {"keep": 0.5}}]},
    "mlp_neurons": {"prune": [{"unit": "mlp_neurons", "ratio": 0.5}]},
    "heads": {"prune": [{"unit": "heads", "ratio": 0.5}]},
    "prune_then_lrd": {
        "prune": [{"unit": "mlp_neurons", "ratio": 0.25}],
        "lrd": [{"roles": ["attn_out"], "rank": 8}],
    },
}
TOLERANCE = 1e-5


def _other_shape() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 13), generator=torch.Generator().manual_seed(2))


def _export_and_load(gm: torch.fx.GraphModule, args: tuple, tmp_path) -> torch.nn.Module:
    program = torch.export.export(gm, args, dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},), strict=False)
    path = tmp_path / "compressed.pt2"
    torch.export.save(program, path)
    return torch.export.load(path).module()


def _parameter_shapes(module: torch.nn.Module) -> dict[str, tuple]:
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("plan_name", sorted(PLANS))
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_compressed_graph_roundtrip(name, plan_name, hard, tmp_path):
    model, args, _ = CASES[name].make()
    gm = surgeon_fx.capture(model, args)
    surgeon_fx.compress(gm, PLANS[plan_name], hard=hard)
    other = _other_shape()
    with torch.no_grad():
        expected = output_tensor(gm(*args))
        expected_other = output_tensor(gm(other))

    loaded = _export_and_load(gm, args, tmp_path)

    with torch.no_grad():
        output = output_tensor(loaded(*args))
        output_other = output_tensor(loaded(other))
    assert (output - expected).abs().max().item() <= TOLERANCE
    assert (output_other - expected_other).abs().max().item() <= TOLERANCE
    assert _parameter_shapes(loaded) == _parameter_shapes(gm)


def test_lrd_roundtrip_keeps_factors(tmp_path):
    model, args, _ = CASES["llama"].make()
    gm = surgeon_fx.capture(model, args)
    surgeon_fx.compress(gm, PLANS["lrd"], hard=True)

    shapes = _parameter_shapes(_export_and_load(gm, args, tmp_path))

    assert shapes["layers.0.self_attn.q_proj.v"] == (8, 64)  # (rank, in_features)
    assert shapes["layers.0.self_attn.q_proj.u"] == (64, 8)  # (out_features, rank)
    assert "layers.0.self_attn.q_proj.weight" not in shapes
    assert shapes["layers.1.mlp.up_proj.v"] == (21, 64)  # rank floor(0.5 * 128 * 64 / (128 + 64))


def test_soft_roundtrip_then_restore(tmp_path):
    model, args, _ = CASES["bert"].make()
    gm = surgeon_fx.capture(model, args)
    code = gm.code
    originals = {name: t.clone() for name, t in gm.state_dict().items()}
    surgeon_fx.compress(gm, PLANS["lrd"])

    _export_and_load(gm, args, tmp_path)
    surgeon_fx.restore(gm)

    assert gm.code == code
    state = gm.state_dict()
    assert sorted(state) == sorted(originals)
    for key, tensor in originals.items():
        assert torch.equal(state[key], tensor), key
