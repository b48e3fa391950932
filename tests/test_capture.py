"""Tests for ``surgeon_fx.capture``: graphs that compute what the model computes.

Every Hugging Face case of ``models.py`` is captured and run against its eager
model. The user-written transformer and ``nn.TransformerEncoderLayer`` cover plain
modules. Bad input must raise ``CaptureError`` with a message that states what to do.
"""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn
from transformers.pytorch_utils import Conv1D

import surgeon_fx
from models import CASES, VOCAB, output_tensor
from surgeon_fx import CaptureError, SurgeonError
from user_models import DataDependentBranch, ForwardRaises, user_transformer


pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def captured():
    """Capture each case once: ``name -> (model, gm, args, kwargs)``."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model, args, kwargs = CASES[name].make()
            cache[name] = (model, surgeon_fx.capture(model, args, kwargs), args, kwargs)
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_capture_output_equals_eager(name, captured):
    model, gm, args, kwargs = captured(name)

    assert isinstance(gm, fx.GraphModule)
    with torch.no_grad():
        expected = output_tensor(model(*args, **kwargs))
        # The graph takes the inputs the caller gave, with no added use_cache argument.
        actual = output_tensor(gm(*args, **kwargs))
    assert actual.shape == expected.shape
    assert torch.equal(actual, expected), f"max difference {(actual - expected).abs().max().item()}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_capture_keeps_linear_module_paths(name, captured):
    model, gm, _, _ = captured(name)
    linear_paths = {path for path, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}

    analysis = surgeon_fx.analyze(gm)

    assert {site.path for site in analysis.sites} == linear_paths
    for site in analysis.sites:
        if site.node.op == "call_function":
            assert "nn_module_stack" in site.node.meta, site.path


def test_capture_returns_graph_module_as_is(captured):
    _, gm, args, _ = captured("llama")
    code = gm.code

    assert surgeon_fx.capture(gm) is gm
    assert surgeon_fx.capture(gm, args) is gm
    assert gm.code == code


@pytest.mark.parametrize("name", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("shape", [(3, 13), (1, 8), (2, 1)])
def test_capture_runs_at_other_sizes(name, shape, captured):
    model, gm, args, _ = captured(name)
    assert tuple(args[0].shape) == (2, 8)
    ids = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(2))

    with torch.no_grad():
        expected = output_tensor(model(ids))
        actual = output_tensor(gm(ids))

    assert actual.shape == (*shape, 64)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "bert"])
@pytest.mark.parametrize("shape", [(1, 8), (2, 1), (1, 1)])
def test_capture_size_one_example(name, shape):
    # torch.export specialises size-1 dimensions, so a one-sentence example must not
    # give a graph that runs only at batch size 1.
    model, _, _ = CASES[name].make()
    example = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(1))
    gm = surgeon_fx.capture(model, (example,))
    ids = torch.randint(0, VOCAB, (3, 13), generator=torch.Generator().manual_seed(2))

    with torch.no_grad():
        torch.testing.assert_close(output_tensor(gm(example)), output_tensor(model(example)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(output_tensor(gm(ids)), output_tensor(model(ids)), rtol=1e-5, atol=1e-5)


class BroadcastMask(nn.Module):
    """Adds a mask of shape (B, 1, 1, T) to scores of shape (B, 2, T, T)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.linear(x)  # (B, 2, T, 8)
        return hidden @ hidden.transpose(-1, -2) + mask


def test_capture_size_one_broadcast_dimension():
    # Dimension 1 of the mask broadcasts, so only the batch dimension can be widened.
    torch.manual_seed(0)
    model = BroadcastMask().eval()
    x, mask = torch.randn(1, 2, 5, 8), torch.zeros(1, 1, 1, 5)
    gm = surgeon_fx.capture(model, (x, mask))
    x3, mask3 = torch.randn(3, 2, 5, 8), torch.zeros(3, 1, 1, 5)

    with torch.no_grad():
        assert torch.equal(gm(x, mask), model(x, mask))
        assert torch.equal(gm(x3, mask3), model(x3, mask3))


def test_capture_dynamic_with_keyword_order():
    # Keyword arguments in another order than forward's signature, one of them not a tensor.
    model, (ids,), _ = CASES["llama"].make()
    mask = torch.ones(2, 8, dtype=torch.long)
    gm = surgeon_fx.capture(model, (ids,), {"use_cache": False, "attention_mask": mask})
    new_ids = torch.randint(0, VOCAB, (3, 13), generator=torch.Generator().manual_seed(2))
    new_mask = torch.ones(3, 13, dtype=torch.long)
    new_mask[0, 9:] = 0

    with torch.no_grad():
        expected = output_tensor(model(new_ids, attention_mask=new_mask))
        actual = output_tensor(gm(new_ids, attention_mask=new_mask, use_cache=False))

    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_capture_resets_use_cache_config():
    model, args, kwargs = CASES["llama"].make()
    assert model.config.use_cache is True

    surgeon_fx.capture(model, args, kwargs)

    assert model.config.use_cache is True


@pytest.mark.parametrize("kind", ["sdpa", "matmul"])
def test_capture_symbolic_traced_user_transformer(kind):
    model, ids = user_transformer(kind)
    traced = fx.symbolic_trace(model)

    gm = surgeon_fx.capture(traced, (ids,))

    assert gm is traced
    # Example inputs propagate shapes onto a graph that had none.
    linear_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "blocks.0.attn.query"]
    assert len(linear_nodes) == 1
    assert tuple(linear_nodes[0].meta["tensor_meta"].shape) == (2, 8, 32)
    with torch.no_grad():
        assert torch.equal(gm(ids), model(ids))


@pytest.mark.parametrize("kind", ["sdpa", "matmul"])
def test_capture_exports_user_transformer(kind):
    model, ids = user_transformer(kind)

    gm = surgeon_fx.capture(model, (ids,))
    other = torch.randint(0, 50, (3, 13), generator=torch.Generator().manual_seed(3))

    assert isinstance(gm, fx.GraphModule)
    with torch.no_grad():
        assert torch.equal(gm(ids), model(ids))
        torch.testing.assert_close(gm(other), model(other), rtol=1e-5, atol=1e-5)


def test_capture_transformer_encoder_layer():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True).eval()
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    fastpath = torch.backends.mha.get_fastpath_enabled()

    gm = surgeon_fx.capture(layer, (x,))

    assert torch.backends.mha.get_fastpath_enabled() == fastpath
    # With gradients on, eager takes the same non-fused path as the graph.
    assert torch.equal(gm(x), layer(x))
    with torch.no_grad():
        # Under no_grad eager may take the fused fast path, so allow rounding.
        torch.testing.assert_close(gm(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("value", "type_name"),
    [(object(), "object"), ({"weight": torch.zeros(2)}, "dict"), (torch.zeros(2), "Tensor")],
)
def test_capture_rejects_non_module(value, type_name):
    with pytest.raises(CaptureError) as info:
        surgeon_fx.capture(value, (torch.zeros(2),))

    message = str(info.value)
    assert isinstance(info.value, SurgeonError)
    assert f"got {type_name}" in message
    assert "torch.nn.Module" in message


def test_capture_forward_raises():
    with pytest.raises(CaptureError) as info:
        surgeon_fx.capture(ForwardRaises(), (torch.zeros(2, 4),))

    message = str(info.value)
    assert "ForwardRaises" in message
    assert "RuntimeError" in message
    assert "weights not loaded" in message
    assert "args and kwargs" in message
    assert isinstance(info.value.__cause__, RuntimeError)


def test_capture_wrong_input_shape():
    model, _, _ = CASES["bert"].make()

    with pytest.raises(CaptureError) as info:
        surgeon_fx.capture(model, (torch.zeros(2, 8, 3, dtype=torch.float32),))

    assert "BertModel" in str(info.value)


def test_capture_data_dependent_control_flow():
    with pytest.raises(CaptureError) as info:
        surgeon_fx.capture(DataDependentBranch(), (torch.ones(2, 4),))

    message = str(info.value)
    assert "DataDependentBranch" in message
    assert "torch.export.export failed" in message
    assert "torch.fx.symbolic_trace failed" in message
    assert "data-dependent" in message.lower()
    assert "torch.cond" in message
    assert info.value.__cause__ is not None
