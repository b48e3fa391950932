"""Tests for ``LinearLRD`` and for ``compress``/``restore`` with low-rank decomposition.

The unit tests check the layer against its formula and against the Eckart–Young
theorem: a rank-r truncated SVD leaves a Frobenius error equal to the norm of the
dropped singular values. The model tests run on tiny Llama, Qwen2, BERT, GPT-2
(Conv1D, weights stored transposed), ViT and the real all-MiniLM-L6-v2.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import surgeon_fx
from causal_lms import causal_lm, token_ids
from models import CASES, VOCAB, minilm, minilm_tokenizer, output_tensor
from surgeon_fx import LinearLRD, RestoreError, SurgeonWarning

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ATTENTION_AND_MLP = ["q", "k", "v", "qkv", "attn_out", "mlp_gate", "mlp_up", "mlp_gate_up", "mlp_down"]
# MiniLM (36 SVDs of up to 384x1536 per compress) runs through one combined test.
LRD_CASES = ["llama", "qwen2", "bert", "gpt2", "vit"]
# Linear layers that are neither attention nor MLP (role "other"), by case.
OTHER_PATHS = {"bert": {"pooler.dense"}, "vit": {"pooler.dense"}, "minilm": {"pooler.dense"}}
RANK = 8
SENTENCES = [
    "The cat sat on the warm windowsill and watched the rain.",
    "Compilers turn source code into machine instructions.",
    "A short one.",
]


# ---------------------------------------------------------------- LinearLRD unit tests


def seeded_linear(in_features: int, out_features: int, bias: bool = True, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


@settings(max_examples=40, deadline=None)
@given(
    in_features=st.integers(1, 12),
    out_features=st.integers(1, 12),
    rank_fraction=st.floats(0.0, 1.0),
    leading=st.lists(st.integers(1, 4), max_size=3),
    bias=st.booleans(),
)
def test_lrd_forward_formula(in_features, out_features, rank_fraction, leading, bias):
    rank = 1 + int(rank_fraction * (min(in_features, out_features) - 1))
    layer = LinearLRD(in_features, out_features, rank, bias=bias)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    x = torch.randn(*leading, in_features, generator=generator)

    y = layer(x)

    expected = x @ layer.v.T @ layer.u.T
    if bias:
        expected = expected + layer.bias
    assert y.shape == (*leading, out_features)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("leading", [(), (5,), (2, 3), (2, 3, 4)])
def test_lrd_full_rank_bit_identical(dtype, bias, leading):
    linear = seeded_linear(24, 16, bias, dtype)
    x = torch.randn(*leading, 24).to(dtype)

    layer = LinearLRD.from_linear(linear, "full")

    assert layer.rank is None
    assert (layer.in_features, layer.out_features) == (24, 16)
    assert torch.equal(layer(x), linear(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lrd_truncation_error_eckart_young(dtype):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 9, generator=generator, dtype=torch.float64).to(dtype)
    singular = torch.linalg.svdvals(weight.double())
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4

    for rank in range(1, 10):
        layer = LinearLRD.from_weight(weight, None, rank)
        residual = (weight - layer.dense_weight()).double()

        frobenius = torch.linalg.matrix_norm(residual).item()
        expected = singular[rank:].square().sum().sqrt().item()
        assert frobenius == pytest.approx(expected, abs=tolerance), f"rank {rank}"
        if rank < 9:
            spectral = torch.linalg.matrix_norm(residual, ord=2).item()
            assert spectral == pytest.approx(singular[rank].item(), abs=tolerance), f"rank {rank}"


def test_lrd_factors_share_singular_values():
    # U = U_r sqrt(S_r), V = sqrt(S_r) V_r^T, so U^T U = V V^T = diag(S_r).
    weight = torch.randn(20, 14, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    singular = torch.linalg.svdvals(weight)

    layer = LinearLRD.from_weight(weight, None, 5)

    torch.testing.assert_close(layer.u.T @ layer.u, torch.diag(singular[:5]))
    torch.testing.assert_close(layer.v @ layer.v.T, torch.diag(singular[:5]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lrd_low_precision_weights(dtype):
    linear = seeded_linear(48, 32, True, dtype)
    weight_before = linear.weight.detach().clone()
    x = torch.randn(3, 48).to(dtype)

    layer = LinearLRD.from_linear(linear, 8)

    assert layer.u.dtype == dtype
    assert layer.v.dtype == dtype
    assert layer.bias.dtype == dtype
    assert layer(x).dtype == dtype
    assert torch.equal(linear.weight, weight_before)
    assert torch.equal(layer.bias, linear.bias)
    # Compare with the best rank-8 approximation computed in float64.
    u, s, vh = torch.linalg.svd(weight_before.double(), full_matrices=False)
    best = (u[:, :8] * s[:8]) @ vh[:8]
    relative = torch.linalg.matrix_norm(layer.dense_weight().double() - best) / torch.linalg.matrix_norm(best)
    assert relative.item() < 2e-2


def test_lrd_from_conv1d():
    torch.manual_seed(0)
    conv = Conv1D(12, 8)  # nf=12 outputs, nx=8 inputs, weight stored as (8, 12)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    x = torch.randn(2, 3, 8)

    full = LinearLRD.from_linear(conv, "full")
    max_rank = LinearLRD.from_linear(conv, 8)
    low = LinearLRD.from_linear(conv, 3)

    assert (full.in_features, full.out_features) == (8, 12)
    torch.testing.assert_close(full(x), conv(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(max_rank(x), conv(x), rtol=1e-5, atol=1e-5)
    singular = torch.linalg.svdvals(conv.weight.detach().double())
    error = torch.linalg.matrix_norm((conv.weight.T - low.dense_weight()).double()).item()
    assert error == pytest.approx(singular[3:].square().sum().sqrt().item(), rel=1e-5)


@pytest.mark.parametrize("rank", [0, -1, 17])
def test_lrd_rejects_rank_out_of_range(rank):
    linear = seeded_linear(24, 16)

    with pytest.raises(ValueError) as info:
        LinearLRD.from_linear(linear, rank)

    assert "[1, 16]" in str(info.value)
    assert f"got {rank}" in str(info.value)


# ---------------------------------------------------------------- compress and restore


def make_case(name: str, dtype: torch.dtype = torch.float32):
    """Return ``(model, args, kwargs)`` for a case name of ``LRD_CASES``."""
    if name == "minilm":
        model = minilm()
        batch = minilm_tokenizer()(SENTENCES, padding=True, return_tensors="pt")
        args, kwargs = (batch["input_ids"],), {"attention_mask": batch["attention_mask"]}
    else:
        model, args, kwargs = CASES[name].make()
    return model.to(dtype), args, kwargs


@pytest.fixture(scope="module")
def captured():
    """Capture each case once: ``(name, dtype) -> (model, gm, args, kwargs, output)``."""
    cache = {}

    def get(name: str, dtype: torch.dtype = torch.float32):
        if (name, dtype) not in cache:
            model, args, kwargs = make_case(name, dtype)
            gm = surgeon_fx.capture(model, args, kwargs)
            with torch.no_grad():
                output = output_tensor(gm(*args, **kwargs))
            cache[name, dtype] = (model, gm, args, kwargs, output)
        return cache[name, dtype]

    return get


@pytest.fixture
def fresh(captured):
    """Return a private copy of a captured case, so each test starts from the original."""

    def get(name: str, dtype: torch.dtype = torch.float32):
        model, gm, args, kwargs, output = captured(name, dtype)
        return model, copy.deepcopy(gm), args, kwargs, output

    return get


def run(gm, args, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(gm(*args, **kwargs))


def selected_shapes(model: nn.Module, name: str) -> dict[str, tuple[int, ...]]:
    """Return the weight shape of every attention and MLP linear, read from the eager model."""
    return {
        path: tuple(module.weight.shape)
        for path, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and path not in OTHER_PATHS.get(name, set())
    }


def snapshot(gm) -> tuple[str, dict[str, torch.Tensor]]:
    return gm.code, {key: value.detach().clone() for key, value in gm.state_dict().items()}


def assert_same_state(gm, before: tuple[str, dict[str, torch.Tensor]]) -> None:
    code, tensors = before
    after = gm.state_dict()
    assert gm.code == code
    assert list(after) == list(tensors)
    for key, value in tensors.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key], value), key


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def predicted_parameters(model: nn.Module, name: str, rank: int) -> int:
    """Count the parameters after decomposing every attention and MLP linear to ``rank``."""
    total = parameter_count(model)
    for fan_a, fan_b in selected_shapes(model, name).values():
        # An (a, b) weight becomes U (a, r) and V (r, b). Conv1D's (in, out) gives the same count.
        total += rank * (fan_a + fan_b) - fan_a * fan_b
    return total


def all_roles(rank) -> dict:
    return {"lrd": [{"roles": ATTENTION_AND_MLP, "rank": rank}]}


def lrd_modules(gm) -> dict[str, int | None]:
    return {path: m.rank for path, m in gm.named_modules() if isinstance(m, LinearLRD)}


@pytest.mark.parametrize("name", LRD_CASES)
def test_compress_full_rank_equals_original(name, fresh):
    _, gm, args, kwargs, output = fresh(name)

    surgeon_fx.compress(gm, all_roles("full"))

    assert torch.equal(run(gm, args, kwargs), output)
    assert all(rank is None for rank in lrd_modules(gm).values())


@pytest.mark.parametrize("name", LRD_CASES)
def test_compress_max_rank_matches_output(name, fresh):
    model, gm, args, kwargs, output = fresh(name)
    shapes = selected_shapes(model, name)
    plan = {"lrd": [{"paths": [path], "rank": min(shape)} for path, shape in shapes.items()]}

    surgeon_fx.compress(gm, plan)

    assert lrd_modules(gm) == {path: min(shape) for path, shape in shapes.items()}
    torch.testing.assert_close(run(gm, args, kwargs), output, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", LRD_CASES)
def test_compress_rank_parameter_count(name, fresh):
    model, gm, args, kwargs, output = fresh(name)
    assert parameter_count(gm) == parameter_count(model)

    surgeon_fx.compress(gm, all_roles(RANK))

    assert parameter_count(gm) == predicted_parameters(model, name, RANK)
    assert lrd_modules(gm) == {path: RANK for path in selected_shapes(model, name)}


@pytest.mark.parametrize("name", LRD_CASES)
def test_compress_output_finite_and_lint(name, fresh):
    _, gm, args, kwargs, output = fresh(name)

    surgeon_fx.compress(gm, all_roles(RANK))

    gm.graph.lint()
    compressed = run(gm, args, kwargs)
    assert compressed.shape == output.shape
    assert torch.isfinite(compressed).all()
    assert not torch.equal(compressed, output)


@pytest.mark.parametrize("name", ["llama", "bert", "gpt2"])
def test_compress_runs_at_other_sizes(name, fresh):
    _, gm, _, _, _ = fresh(name)
    ids = torch.randint(0, VOCAB, (3, 13), generator=torch.Generator().manual_seed(2))

    surgeon_fx.compress(gm, all_roles(RANK))

    assert run(gm, (ids,), {}).shape == (3, 13, 64)


@pytest.mark.parametrize("name", LRD_CASES)
def test_soft_compress_restore_bit_exact(name, fresh):
    _, gm, args, kwargs, output = fresh(name)
    before = snapshot(gm)
    names = [key for key, _ in gm.named_parameters()]

    surgeon_fx.compress(gm, all_roles(RANK))
    assert gm.code != before[0]
    returned = surgeon_fx.restore(gm)

    assert returned is gm
    assert_same_state(gm, before)
    assert [key for key, _ in gm.named_parameters()] == names
    assert lrd_modules(gm) == {}
    gm.graph.lint()
    assert torch.equal(run(gm, args, kwargs), output)


@pytest.mark.parametrize("name", LRD_CASES)
def test_hard_compress_shrinks_bytes(name, fresh):
    model, gm, args, kwargs, _ = fresh(name)
    bytes_before = parameter_bytes(gm)
    element = next(gm.parameters()).element_size()

    surgeon_fx.compress(gm, all_roles(RANK), hard=True)

    assert parameter_bytes(gm) == predicted_parameters(model, name, RANK) * element
    assert parameter_bytes(gm) < bytes_before
    assert torch.isfinite(run(gm, args, kwargs)).all()
    with pytest.raises(RestoreError, match="hard-compressed"):
        surgeon_fx.restore(gm)


@pytest.mark.parametrize(("name", "path"), [("llama", "layers.0.mlp.down_proj"), ("gpt2", "h.0.mlp.c_proj")])
def test_hard_compress_frees_original(name, path, fresh):
    _, gm, _, _, _ = fresh(name)
    original = weakref.ref(gm.get_parameter(f"{path}.weight"))

    surgeon_fx.compress(gm, {"lrd": [{"paths": [path], "rank": RANK}]}, hard=True)
    gc.collect()

    assert original() is None


def test_restore_uncompressed_is_noop(fresh):
    _, gm, args, kwargs, output = fresh("llama")
    before = snapshot(gm)

    surgeon_fx.restore(gm)

    assert_same_state(gm, before)
    assert torch.equal(run(gm, args, kwargs), output)


def test_compress_restore_cycles(fresh):
    _, gm, args, kwargs, output = fresh("gpt2")
    before = snapshot(gm)

    for plan in (all_roles(RANK), {"lrd": [{"roles": ["mlp_up"], "layers": [1], "rank": 2}]}, all_roles(16)):
        surgeon_fx.compress(gm, plan)
        assert not torch.equal(run(gm, args, kwargs), output)
        surgeon_fx.restore(gm)
        assert_same_state(gm, before)

    assert torch.equal(run(gm, args, kwargs), output)


def test_compress_after_hard_raises(fresh):
    _, gm, _, _, _ = fresh("llama")
    surgeon_fx.compress(gm, all_roles(RANK), hard=True)
    before = snapshot(gm)

    with pytest.raises(surgeon_fx.SurgeonError, match="permanent"):
        surgeon_fx.compress(gm, all_roles(4))

    assert_same_state(gm, before)


def tied_lm(name: str) -> nn.Module:
    if name == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(config).eval()
    return causal_lm("llama", tie_word_embeddings=True)


@pytest.mark.parametrize(("name", "embedding"), [("gpt2", "transformer.wte"), ("llama", "model.embed_tokens")])
@pytest.mark.parametrize("hard", [False, True])
def test_compress_tied_lm_head(name, embedding, hard):
    # lm_head shares its weight with the token embedding, which must keep working.
    model = tied_lm(name)
    assert model.lm_head.weight is model.get_submodule(embedding).weight
    ids = token_ids()
    gm = surgeon_fx.capture(model, (ids,))
    before = snapshot(gm)
    output = run(gm, (ids,), {})
    embedding_weight = gm.get_parameter(f"{embedding}.weight").detach().clone()

    surgeon_fx.compress(gm, {"lrd": [{"paths": ["lm_head"], "rank": RANK}]}, hard=hard)

    gm.graph.lint()
    assert lrd_modules(gm) == {"lm_head": RANK}
    assert torch.equal(gm.get_parameter(f"{embedding}.weight"), embedding_weight)
    # Parameters count a shared tensor once: the embedding stays, the factors are added.
    assert parameter_count(gm) == parameter_count(model) + RANK * (VOCAB + 64)
    compressed = run(gm, (ids,), {})
    assert compressed.shape == output.shape
    assert torch.isfinite(compressed).all()
    if hard:
        return
    surgeon_fx.restore(gm)
    assert_same_state(gm, before)
    assert torch.equal(run(gm, (ids,), {}), output)


def train_factors(gm, args, kwargs, steps: int = 3) -> None:
    factors = [p for key, p in gm.named_parameters() if key.endswith((".u", ".v"))]
    assert factors and all(p.requires_grad for p in factors)
    optimizer = torch.optim.SGD(factors, lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = output_tensor(gm(*args, **kwargs)).square().mean()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("name", ["llama", "bert", "gpt2"])
def test_compress_twice_soft_keeps_trained_factors(name, fresh):
    _, gm, args, kwargs, _ = fresh(name)
    surgeon_fx.compress(gm, all_roles(RANK))
    initial = snapshot(gm)
    train_factors(gm, args, kwargs)
    trained = snapshot(gm)
    assert any(not torch.equal(trained[1][k], initial[1][k]) for k in initial[1])
    trained_output = run(gm, args, kwargs)

    with pytest.warns(SurgeonWarning, match="already soft-compressed"):
        surgeon_fx.compress(gm, all_roles(RANK))

    assert_same_state(gm, trained)
    assert torch.equal(run(gm, args, kwargs), trained_output)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_hard_after_soft_keeps_factors(name, fresh):
    model, gm, args, kwargs, _ = fresh(name)
    surgeon_fx.compress(gm, {"lrd": [{"roles": ["mlp_down", "attn_out"], "rank": RANK}]})
    train_factors(gm, args, kwargs)
    trained = snapshot(gm)
    trained_output = run(gm, args, kwargs)

    surgeon_fx.compress(gm, all_roles(RANK), hard=True)

    assert_same_state(gm, trained)
    assert torch.equal(run(gm, args, kwargs), trained_output)
    with pytest.raises(RestoreError):
        surgeon_fx.restore(gm)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_compress_bfloat16_model(name, fresh):
    model, gm, args, kwargs, output = fresh(name, torch.bfloat16)
    before = snapshot(gm)
    assert output.dtype == torch.bfloat16

    surgeon_fx.compress(gm, all_roles(RANK))

    compressed = run(gm, args, kwargs)
    assert compressed.dtype == torch.bfloat16
    assert torch.isfinite(compressed).all()
    assert all(p.dtype == torch.bfloat16 for p in gm.parameters())
    assert parameter_count(gm) == predicted_parameters(model, name, RANK)
    surgeon_fx.restore(gm)
    assert_same_state(gm, before)
    assert torch.equal(run(gm, args, kwargs), output)


def test_compress_minilm_end_to_end(fresh):
    model, gm, args, kwargs, output = fresh("minilm")
    before = snapshot(gm)
    assert len(selected_shapes(model, "minilm")) == 36

    surgeon_fx.compress(gm, all_roles(RANK))

    gm.graph.lint()
    assert parameter_count(gm) == predicted_parameters(model, "minilm", RANK)
    compressed = run(gm, args, kwargs)
    assert compressed.shape == output.shape
    assert torch.isfinite(compressed).all()

    surgeon_fx.restore(gm)

    assert_same_state(gm, before)
    assert torch.equal(run(gm, args, kwargs), output)

    bytes_before = parameter_bytes(gm)
    surgeon_fx.compress(gm, all_roles(RANK), hard=True)

    assert parameter_bytes(gm) == predicted_parameters(model, "minilm", RANK) * 4
    assert parameter_bytes(gm) < bytes_before
    with pytest.raises(RestoreError, match="hard-compressed"):
        surgeon_fx.restore(gm)


def test_compress_minilm_full_rank(fresh):
    _, gm, args, kwargs, output = fresh("minilm")

    surgeon_fx.compress(gm, all_roles("full"))

    assert torch.equal(run(gm, args, kwargs), output)
