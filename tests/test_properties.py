"""Property tests: the invariants of ``surgeon_fx.testing`` on drawn models and plans.

Models come from :func:`surgeon_fx.testing.transformer_configs` (small Llama,
Mistral, Qwen2, Qwen3, Gemma, Phi-3, BERT and GPT-2 configurations), plans from
:func:`~surgeon_fx.testing.plans` and :func:`~surgeon_fx.testing.invalid_plans`.
Example counts scale with the Hypothesis profile: ``ci`` (the default here) keeps
the module to a few minutes on 2 cores, ``pytest --hypothesis-profile=thorough``
runs many more. Each ``@example`` is the minimal case of a bug the properties
found; the body draws a plan only when the example gives none.

Module names appear here, and only here, as an oracle for the roles: the library
gives roles from the graph's structure alone.
"""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import surgeon_fx
from surgeon_fx.testing import (
    ModelSpec,
    build_model,
    check_invariants,
    check_plan,
    check_rejected,
    invalid_plans,
    plans,
    transformer_configs,
)
from surgeon_fx.testing.invariants import analyze_quietly

pytestmark = pytest.mark.usefixtures("torch_single_thread")

DOC = Path(__file__).resolve().parent.parent / "docs" / "testing.md"


def examples(share: float) -> int:
    """Return ``share`` of the loaded profile's ``max_examples``, at least 1."""
    return max(1, round(settings().max_examples * share))


# Module-name suffix -> role, for Llama-like, Phi-3, BERT and GPT-2 modules.
NAME_ROLES = [
    (r"\.q_proj$|\.attention\.self\.query$", "q"),
    (r"\.k_proj$|\.attention\.self\.key$", "k"),
    (r"\.v_proj$|\.attention\.self\.value$", "v"),
    (r"\.qkv_proj$|\.attn\.c_attn$", "qkv"),
    (r"\.o_proj$|\.attention\.output\.dense$|\.attn\.c_proj$", "attn_out"),
    (r"\.gate_up_proj$", "mlp_gate_up"),
    (r"\.gate_proj$", "mlp_gate"),
    (r"\.up_proj$|\.intermediate\.dense$|\.mlp\.c_fc$", "mlp_up"),
    (r"\.down_proj$|\.layer\.\d+\.output\.dense$|\.mlp\.c_proj$", "mlp_down"),
    (r"^lm_head$|^pooler\.dense$", "other"),
]


def expected_role(path: str) -> str:
    for pattern, role in NAME_ROLES:
        if re.search(pattern, path):
            return role
    raise AssertionError(f"no expected role for module {path}")


def assert_roles_match_names(model: nn.Module, analysis) -> None:
    roles = {site.path: site.role for site in analysis.sites}
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        assert path in roles, f"no linear site for module {path}; sites: {sorted(roles)}"
        assert roles[path] == expected_role(path), f"{path}: role {roles[path]!r}, expected {expected_role(path)!r}"


def assert_geometry(spec: ModelSpec, analysis) -> None:
    assert len(analysis.attention) == spec.num_layers
    for op in analysis.attention:
        assert (op.num_heads, op.num_kv_heads, op.head_dim) == (spec.num_heads, spec.num_kv_heads, spec.head_dim), op


def quiet_capture(model, args, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return surgeon_fx.capture(model, args, kwargs)


# --- drawn models --------------------------------------------------------------------


SMALL_LLAMA = ModelSpec(
    "llama", 16, 2, 2, 46, 1, attn_implementation="eager", options={"head_dim": 4}, batch=1, seq_len=2
)


@settings(max_examples=examples(0.5))
@given(spec=transformer_configs(), data=st.data(), plan=st.none())
# A budget that pays for rank 1 on every site left the 46x16 gate projection at rank 0,
# because greedy allocation spent it on sites with larger gains first.
@example(
    spec=SMALL_LLAMA, data=None,
    plan={"lrd": [{"roles": ["attn_out", "k", "mlp_gate", "mlp_up"], "budget": {"params": 0.1}, "method": "svd"}]},
)
# A budget rule spread its budget over sites that a later rule takes, so the sites it
# kept held 562 of their 864 weights under a budget of 0.5.
@example(
    spec=SMALL_LLAMA, data=None,
    plan={"lrd": [{"roles": ["attn_out", "mlp_down", "mlp_up"], "budget": {"params": 0.5}},
                  {"roles": ["mlp_up"], "rank": "full"}]},
)
# Harness bug: Qwen3Config defaults head_dim to 128, so the spec must always pass it.
@example(
    spec=ModelSpec("qwen3", 8, 1, 1, 4, 1, lm_head=True, attn_implementation="eager",
                   options={"attention_bias": True}, batch=1, seq_len=2),
    data=None, plan={"lrd": [{"roles": ["q"], "rank": 1}]},
)
# Harness bug: decomposing a tied output head keeps the embedding it shares, and the
# parameter prediction had replaced the embedding's count by the factors' count.
@example(
    spec=ModelSpec("llama", 8, 1, 1, 14, 1, tie_embeddings=True, lm_head=True, options={"head_dim": 4}, seq_len=3),
    data=None, plan={"lrd": [{"rank": {"keep": 0.38}}]},
)
def test_drawn_model_keeps_invariants(spec, data, plan):
    model, args, kwargs = build_model(spec)
    gm = quiet_capture(model, args, kwargs)
    analysis = analyze_quietly(gm)
    assert_roles_match_names(model, analysis)
    assert_geometry(spec, analysis)
    if plan is None:
        plan = data.draw(plans(analysis), label="plan")

    check_invariants(gm, args, kwargs, plan)


# --- drawn plans on fixed models -------------------------------------------------------

FIXED_SPECS = {
    "llama": ModelSpec("llama", 16, 4, 2, 24, 2, lm_head=True, options={"attention_bias": True, "mlp_bias": False}),
    "qwen2": ModelSpec("qwen2", 16, 2, 1, 20, 2, attn_implementation="eager"),
    "gemma": ModelSpec("gemma", 32, 4, 2, 24, 1, activation="gelu_pytorch_tanh", lm_head=True, tie_embeddings=True,
                       options={"head_dim": 4, "attention_bias": False}),
    "phi3": ModelSpec("phi3", 16, 4, 2, 24, 2, lm_head=True),
    "bert": ModelSpec("bert", 16, 4, 4, 24, 2, activation="gelu"),
    "gpt2": ModelSpec("gpt2", 16, 4, 4, 24, 2, activation="gelu_new", lm_head=True),
}
_CAPTURED: dict[str, tuple] = {}


def captured(name: str) -> tuple:
    """Return ``(gm, args, kwargs, analysis)`` of a fixed spec, captured once per session."""
    if name not in _CAPTURED:
        model, args, kwargs = build_model(FIXED_SPECS[name])
        gm = quiet_capture(model, args, kwargs)
        _CAPTURED[name] = (gm, args, kwargs, analyze_quietly(gm))
    return _CAPTURED[name]


@settings(max_examples=examples(1.5))
@given(name=st.sampled_from(sorted(FIXED_SPECS)), data=st.data(), plan=st.none())
def test_drawn_plan_keeps_invariants(name, data, plan):
    gm, args, kwargs, analysis = captured(name)
    if plan is None:
        plan = data.draw(plans(analysis), label="plan")

    check_plan(gm, plan, args, kwargs)


@settings(max_examples=examples(3))
@given(name=st.sampled_from(sorted(FIXED_SPECS)), data=st.data(), plan=st.none())
def test_invalid_plan_rejected(name, data, plan):
    gm, args, kwargs, analysis = captured(name)
    if plan is None:
        plan = data.draw(invalid_plans(analysis), label="invalid plan")

    check_rejected(gm, plan, args, kwargs)


# --- the harness itself ------------------------------------------------------------------


def test_check_invariants_reports_broken_invariant(monkeypatch):
    from surgeon_fx.testing import InvariantError

    gm, args, kwargs, _ = captured("bert")
    plan = {"lrd": [{"roles": ["mlp_down"], "rank": 4}]}
    # A prediction that is off by one must be reported, naming the invariant.
    monkeypatch.setattr("surgeon_fx.testing.invariants.predict_num_params", lambda *a: 1)

    with pytest.raises(InvariantError, match=r"invariant 'param_count' broken: .* has \d+ parameters, the plan predicts 1"):
        check_plan(gm, plan, args, kwargs)


def test_check_rejected_flags_accepted_plan():
    from surgeon_fx.testing import InvariantError

    gm, args, kwargs, _ = captured("bert")

    with pytest.raises(InvariantError, match="invariant 'invalid_plan' broken: .* was accepted"):
        check_rejected(gm, {"lrd": [{"roles": ["mlp_down"], "rank": 2}]})


def test_check_invariants_skip_unknown():
    gm, args, kwargs, _ = captured("bert")

    with pytest.raises(ValueError, match="unknown invariants \\['speed'\\]"):
        check_invariants(gm, args, kwargs, skip=["speed"])


def test_testing_imports_without_hypothesis():
    code = (
        "import sys\n"
        "sys.modules['hypothesis'] = None\n"
        "import surgeon_fx.testing as testing\n"
        "assert callable(testing.check_invariants)\n"
        "try:\n"
        "    testing.plans\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr[-2000:]
    assert "pip install hypothesis" in result.stdout


def test_testing_doc_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) == 2, f"expected 2 python code blocks in {DOC}, found {len(blocks)}"
    namespace: dict = {}

    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - the documented examples
    namespace["test_my_model_plans"]()

    assert namespace.get("checked") is True
