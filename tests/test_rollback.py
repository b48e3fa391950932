"""Tests that a pass failing halfway leaves the graph module as it was.

A failure is injected on the third call of one step of the ``decompose_linear``
pass. For the steps that edit the graph, two sites are already rewritten by then.
``compress`` must raise ``RewriteError`` naming the pass, and the graph code, every
parameter and buffer, and the output must equal the originals.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import fx

import surgeon_fx
from models import CASES, output_tensor
from surgeon_fx import LinearLRD, RewriteError, SurgeonError
from surgeon_fx.passes.manager import Rewriter
from surgeon_fx.passes.rewrite import replace_linear
from user_models import user_transformer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# surgeon_fx.passes exports the pass function under the submodule's name.
decompose_linear_module = importlib.import_module("surgeon_fx.passes.decompose_linear")

FAIL_ON_CALL = 3
# Three rules, so the failing call falls in the middle of a multi-rule plan.
PLANS = {
    "llama": {
        "lrd": [
            {"roles": ["q", "k"], "rank": 4},
            {"roles": ["mlp_down"], "rank": 8},
            {"paths": ["layers.1.self_attn.o_proj"], "rank": 16},
        ]
    },
    "gpt2": {
        "lrd": [
            {"roles": ["qkv"], "rank": 4},
            {"roles": ["mlp_up"], "layers": [0], "rank": 8},
            {"paths": ["h.1.mlp.c_proj"], "rank": 16},
        ]
    },
    "user": {
        "lrd": [
            {"roles": ["q", "v"], "rank": 4},
            {"roles": ["mlp_down"], "rank": 8},
            {"paths": ["blocks.1.attn.out"], "rank": 16},
        ]
    },
}
SITE_COUNTS = {"llama": 7, "gpt2": 4, "user": 7}


class InjectedFailure(RuntimeError):
    pass


def fail_on_call(function, call: int, after: bool = False):
    """Wrap ``function`` so that its ``call``-th call raises, before or after running it."""
    calls = {"count": 0}

    def wrapper(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == call and not after:
            raise InjectedFailure(f"injected failure on call {call}")
        result = function(*args, **kwargs)
        if calls["count"] == call:
            raise InjectedFailure(f"injected failure on call {call}")
        return result

    wrapper.calls = calls
    return wrapper


@pytest.fixture(scope="module")
def captured():
    cache = {}

    def get(name: str):
        if name not in cache:
            if name == "user":
                model, ids = user_transformer("sdpa")
                gm = surgeon_fx.capture(fx.symbolic_trace(model), (ids,))
                args, kwargs = (ids,), {}
            else:
                model, args, kwargs = CASES[name].make()
                gm = surgeon_fx.capture(model, args, kwargs)
            cache[name] = (gm, args, kwargs)
        return cache[name]

    return get


@pytest.fixture
def fresh(captured):
    def get(name: str):
        gm, args, kwargs = captured(name)
        return copy.deepcopy(gm), args, kwargs

    return get


def run(gm, args, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(gm(*args, **kwargs))


def snapshot(gm):
    return gm.code, {key: value.detach().clone() for key, value in gm.state_dict().items()}


def assert_same_state(gm, before) -> None:
    code, tensors = before
    after = gm.state_dict()
    assert gm.code == code
    assert list(after) == list(tensors)
    for key, value in tensors.items():
        assert torch.equal(after[key], value), key
    assert not any(isinstance(m, LinearLRD) for m in gm.modules())


def inject(monkeypatch, point: str):
    """Install a failure at ``point`` and return the wrapper that counts calls."""
    if point == "replace_linear_before":
        wrapper = fail_on_call(replace_linear, FAIL_ON_CALL)
        monkeypatch.setattr(decompose_linear_module, "replace_linear", wrapper)
    elif point == "replace_linear_after":
        wrapper = fail_on_call(replace_linear, FAIL_ON_CALL, after=True)
        monkeypatch.setattr(decompose_linear_module, "replace_linear", wrapper)
    elif point == "swap_module":
        # The third site's module swap fails after the first two sites were rewritten.
        wrapper = fail_on_call(Rewriter.swap_module, FAIL_ON_CALL)
        monkeypatch.setattr(Rewriter, "swap_module", wrapper)
    elif point == "from_weight":
        original = LinearLRD.from_weight
        wrapper = fail_on_call(lambda cls, *args: original(*args), FAIL_ON_CALL)
        monkeypatch.setattr(LinearLRD, "from_weight", classmethod(wrapper))
    else:
        raise ValueError(point)
    return wrapper


@pytest.mark.parametrize("point", ["replace_linear_before", "replace_linear_after", "swap_module", "from_weight"])
@pytest.mark.parametrize("name", sorted(PLANS))
def test_rollback_after_injected_failure(name, point, fresh, monkeypatch):
    gm, args, kwargs = fresh(name)
    before = snapshot(gm)
    output = run(gm, args, kwargs)
    wrapper = inject(monkeypatch, point)

    with pytest.raises(RewriteError) as info:
        surgeon_fx.compress(gm, PLANS[name])

    assert wrapper.calls["count"] == FAIL_ON_CALL
    message = str(info.value)
    assert isinstance(info.value, SurgeonError)
    assert "'decompose_linear'" in message
    assert "InjectedFailure" in message
    assert "rolled back" in message
    assert isinstance(info.value.__cause__, InjectedFailure)
    assert_same_state(gm, before)
    gm.graph.lint()
    assert torch.equal(run(gm, args, kwargs), output)


@pytest.mark.parametrize("name", sorted(PLANS))
def test_rollback_then_compress_and_restore(name, fresh, monkeypatch):
    gm, args, kwargs = fresh(name)
    before = snapshot(gm)
    output = run(gm, args, kwargs)
    inject(monkeypatch, "replace_linear_after")
    with pytest.raises(RewriteError):
        surgeon_fx.compress(gm, PLANS[name])
    monkeypatch.undo()

    surgeon_fx.compress(gm, PLANS[name])

    assert sum(isinstance(m, LinearLRD) for m in gm.modules()) == SITE_COUNTS[name]
    assert torch.isfinite(run(gm, args, kwargs)).all()
    surgeon_fx.restore(gm)
    assert_same_state(gm, before)
    assert torch.equal(run(gm, args, kwargs), output)
