"""Tests for ``surgeon_fx.Plan``: parsing, selectors, ranks and validation errors.

Selection is checked through ``compress`` on a tiny Llama: which submodules became
``LinearLRD`` and with what rank. Every invalid plan must raise ``PlanError`` that
names the rule, the site and the value, and must leave the graph module untouched.

Tiny Llama sites, as (out_features, in_features): q_proj and o_proj 64x64, k_proj
and v_proj 32x64, gate_proj and up_proj 128x64, down_proj 64x128.
"""

from __future__ import annotations

import copy
import json
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import surgeon_fx
from models import CASES
from surgeon_fx import Keep, LinearLRD, LRDRule, Plan, PlanError, Selector, SurgeonError

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ATTN = "layers.{i}.self_attn.{name}"
MLP = "layers.{i}.mlp.{name}"


def q(i):
    return ATTN.format(i=i, name="q_proj")


def k(i):
    return ATTN.format(i=i, name="k_proj")


def v(i):
    return ATTN.format(i=i, name="v_proj")


def o(i):
    return ATTN.format(i=i, name="o_proj")


def gate(i):
    return MLP.format(i=i, name="gate_proj")


def up(i):
    return MLP.format(i=i, name="up_proj")


def down(i):
    return MLP.format(i=i, name="down_proj")


ALL_SITES = [f(i) for i in (0, 1) for f in (q, k, v, o, gate, up, down)]


@pytest.fixture(scope="module")
def captured():
    cache = {}

    def get(name: str):
        if name not in cache:
            model, args, kwargs = CASES[name].make()
            cache[name] = surgeon_fx.capture(model, args, kwargs)
        return cache[name]

    return get


@pytest.fixture
def llama(captured):
    """A private copy of the captured tiny Llama."""
    return copy.deepcopy(captured("llama"))


def lrd_modules(gm) -> dict[str, int | None]:
    return {path: m.rank for path, m in gm.named_modules() if isinstance(m, LinearLRD)}


def snapshot(gm):
    return gm.code, {key: value.detach().clone() for key, value in gm.state_dict().items()}


def assert_unchanged(gm, before) -> None:
    """Check code, names and every tensor bit for bit, counting NaN as equal to NaN."""
    code, tensors = before
    after = gm.state_dict()
    assert gm.code == code
    assert list(after) == list(tensors)
    for key, value in tensors.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    assert lrd_modules(gm) == {}


# ---------------------------------------------------------------- parsing


PLAN_DICT = {
    "lrd": [
        {"roles": ["attn_out", "mlp_down"], "layers": ["0-1"], "rank": 8},
        {"paths": ["layers.1.mlp.down_proj"], "rank": {"keep": 0.5}},
    ]
}
PLAN_TOML = """
[[lrd]]
roles = ["attn_out", "mlp_down"]
layers = ["0-1"]
rank = 8

[[lrd]]
paths = ["layers.1.mlp.down_proj"]
rank = { keep = 0.5 }
"""
# down_proj 64x128 at keep 0.5: floor(0.5 * 64 * 128 / 192) = 21.
PLAN_RANKS = {o(0): 8, o(1): 8, down(0): 8, down(1): 21}


def test_plan_from_dict():
    plan = Plan.from_dict(PLAN_DICT)

    assert len(plan.lrd) == 2
    first, second = plan.lrd
    assert first.selector == Selector(roles=("attn_out", "mlp_down"), layers=(0, 1), paths=None)
    assert first.rank == 8
    assert second.selector == Selector(paths=("layers.1.mlp.down_proj",))
    assert second.rank == Keep(0.5)


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_plan_from_file(suffix, tmp_path, llama):
    path = tmp_path / f"plan{suffix}"
    path.write_text(PLAN_TOML if suffix == ".toml" else json.dumps(PLAN_DICT), encoding="utf-8")

    assert Plan.from_file(path) == Plan.from_dict(PLAN_DICT)
    surgeon_fx.compress(llama, str(path))
    assert lrd_modules(llama) == PLAN_RANKS


def test_plan_round_trip():
    plan = Plan.from_dict(PLAN_DICT)

    data = plan.to_dict()

    assert Plan.from_dict(data) == plan
    assert Plan.from_dict(json.loads(json.dumps(data))) == plan
    assert data["lrd"][0]["roles"] == ["attn_out", "mlp_down"]
    assert data["lrd"][0]["layers"] == [0, 1]
    assert data["lrd"][0]["rank"] == 8
    assert data["lrd"][1]["paths"] == ["layers.1.mlp.down_proj"]
    assert data["lrd"][1]["rank"] == {"keep": 0.5}


def test_plan_built_in_python(llama):
    plan = Plan(lrd=[LRDRule(selector=Selector(roles=("mlp_up",)), rank=Keep(0.5))])

    surgeon_fx.compress(llama, plan)

    assert lrd_modules(llama) == {up(0): 21, up(1): 21}


# ---------------------------------------------------------------- selectors


SELECTOR_CASES = {
    "role": ({"roles": ["q"], "rank": 4}, {q(0): 4, q(1): 4}),
    "role_as_string": ({"roles": "v", "rank": 4}, {v(0): 4, v(1): 4}),
    "layer_index": ({"roles": ["mlp_down"], "layers": [1], "rank": 8}, {down(1): 8}),
    "layer_python_range": ({"roles": ["k", "v"], "layers": range(1, 2), "rank": 2}, {k(1): 2, v(1): 2}),
    "layer_text_range": ({"roles": ["attn_out"], "layers": "0-1", "rank": 4}, {o(0): 4, o(1): 4}),
    "layer_one_element_range": (
        {"layers": ["1-1"], "paths": ["*.mlp.*"], "rank": 4},
        {gate(1): 4, up(1): 4, down(1): 4},
    ),
    "path_glob": ({"paths": ["layers.0.self_attn.?_proj"], "rank": 4}, {q(0): 4, k(0): 4, v(0): 4, o(0): 4}),
    "several_paths": ({"paths": ["*.q_proj", "layers.1.mlp.up_proj"], "rank": 4}, {q(0): 4, q(1): 4, up(1): 4}),
    "all_selectors_must_match": ({"roles": ["q", "k"], "layers": [0], "paths": ["*k_proj"], "rank": 4}, {k(0): 4}),
    "no_selector_matches_all": ({"rank": 4}, {path: 4 for path in ALL_SITES}),
}


@pytest.mark.parametrize("case", sorted(SELECTOR_CASES))
def test_plan_selector(case, llama):
    rule, expected = SELECTOR_CASES[case]

    surgeon_fx.compress(llama, {"lrd": [rule]})

    assert lrd_modules(llama) == expected


def test_plan_last_rule_wins(llama):
    plan = {
        "lrd": [
            {"rank": 4},
            {"paths": ["layers.0.mlp.*"], "rank": 16},
            {"paths": ["layers.0.mlp.down_proj"], "rank": "full"},
            {"roles": ["k"], "layers": [1], "rank": 2},
        ]
    }

    surgeon_fx.compress(llama, plan)

    expected = {path: 4 for path in ALL_SITES}
    expected.update({gate(0): 16, up(0): 16, k(1): 2})
    del expected[down(0)]
    assert lrd_modules(llama) == expected


# ---------------------------------------------------------------- keep fraction


def test_plan_keep_half_ranks(llama):
    surgeon_fx.compress(llama, {"lrd": [{"rank": {"keep": 0.5}}]})

    # floor(0.5 * m * n / (m + n)): 64x64 -> 16, 32x64 -> 10, 128x64 and 64x128 -> 21.
    per_layer = {q: 16, k: 10, v: 10, o: 16, gate: 21, up: 21, down: 21}
    assert lrd_modules(llama) == {site(i): rank for i in (0, 1) for site, rank in per_layer.items()}


def test_plan_keep_parameter_fraction(llama):
    surgeon_fx.compress(llama, {"lrd": [{"roles": ["q"], "rank": {"keep": 0.5}}]})

    layer = llama.get_submodule(q(0))
    kept = layer.u.numel() + layer.v.numel()
    assert kept == 16 * (64 + 64)
    assert kept <= 0.5 * 64 * 64


def test_plan_keep_exact_decimal():
    # 0.3 * 24 * 120 / 144 is exactly 6, though the float product is 5.999...
    assert Keep(0.3).rank_for(24, 120) == 6
    assert Keep(0.29).rank_for(200, 200) == 29


@settings(max_examples=200, deadline=None)
@given(hundredths=st.integers(1, 100), out_features=st.integers(1, 4096), in_features=st.integers(1, 4096))
def test_plan_keep_formula(hundredths, out_features, in_features):
    keep = hundredths / 100
    exact = Fraction(hundredths, 100) * out_features * in_features / (out_features + in_features)

    assert Keep(keep).rank_for(out_features, in_features) == math.floor(exact)


# ---------------------------------------------------------------- invalid plans


def rules(*items) -> dict:
    return {"lrd": list(items)}


VALID_RULE = {"roles": ["q"], "rank": 4}

# name -> (plan, substrings the message must contain)
INVALID_PLANS = {
    "rank_zero": (rules({"roles": ["q"], "rank": 0}), ["lrd rule 0", "rank must be positive", "got 0"]),
    "rank_negative": (rules(VALID_RULE, {"roles": ["k"], "rank": -3}), ["lrd rule 1", "got -3"]),
    "rank_above_min_dim": (
        rules(VALID_RULE, {"roles": ["k"], "rank": 40}),
        ["lrd rule 1", "rank 40", "layers.0.self_attn.k_proj", "32x64", "<= 32"],
    ),
    "rank_bool": (rules({"roles": ["q"], "rank": True}), ["lrd rule 0", "invalid rank True"]),
    "rank_text": (rules({"roles": ["q"], "rank": "half"}), ["lrd rule 0", "invalid rank 'half'"]),
    "keep_above_one": (rules({"roles": ["q"], "rank": {"keep": 1.5}}), ["lrd rule 0", "1.5", "(0, 1]"]),
    "keep_zero": (rules({"roles": ["q"], "rank": {"keep": 0}}), ["lrd rule 0", "'keep': 0"]),
    "keep_gives_rank_zero": (
        rules(VALID_RULE, {"roles": ["k"], "rank": {"keep": 0.01}}),
        ["lrd rule 1", "0.01", "layers.0.self_attn.k_proj", "gives rank 0"],
    ),
    "unknown_role": (rules({"roles": ["attention"], "rank": 4}), ["lrd rule 0", "unknown roles ['attention']"]),
    "unknown_rule_key": (rules(VALID_RULE, {"roles": ["q"], "rnak": 4, "rank": 4}), ["lrd rule 1", "'rnak'"]),
    "unknown_plan_key": ({"lrd": [VALID_RULE], "lora": []}, ["unknown plan keys", "'lora'"]),
    "rule_without_rank": (rules({"roles": ["q"]}), ["lrd rule 0", "'rank'"]),
    "rules_not_a_list": ({"lrd": VALID_RULE}, ["'lrd'", "must be a list", "dict"]),
    "rule_not_a_mapping": (rules("q"), ["lrd rule 0", "must be a mapping", "'q'"]),
    "layer_negative": (rules({"roles": ["q"], "layers": [-1], "rank": 4}), ["lrd rule 0", "invalid layer -1"]),
    "layer_range_reversed": (rules({"roles": ["q"], "layers": ["3-1"], "rank": 4}), ["lrd rule 0", "'3-1'"]),
    "no_match_role": (rules(VALID_RULE, {"roles": ["qkv"], "rank": 4}), ["lrd rule 1", "'qkv'", "matches no linear site"]),
    "no_match_layer": (rules({"roles": ["q"], "layers": [7], "rank": 4}), ["lrd rule 0", "[7]", "matches no linear site"]),
    "no_match_path": (rules({"paths": ["encoder.*"], "rank": 4}), ["lrd rule 0", "encoder.*", "matches no linear site"]),
}


@pytest.mark.parametrize("case", sorted(INVALID_PLANS))
def test_plan_error_changes_nothing(case, llama):
    plan, expected = INVALID_PLANS[case]
    before = snapshot(llama)

    with pytest.raises(PlanError) as info:
        surgeon_fx.compress(llama, plan)

    message = str(info.value)
    assert isinstance(info.value, SurgeonError)
    for text in expected:
        assert text in message
    assert_unchanged(llama, before)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_plan_error_non_finite_weight(value, llama):
    with torch.no_grad():
        llama.get_parameter(f"{up(1)}.weight")[3, 5] = value
    before = snapshot(llama)

    with pytest.raises(PlanError) as info:
        surgeon_fx.compress(llama, rules(VALID_RULE, {"roles": ["mlp_up"], "rank": 4}))

    message = str(info.value)
    assert "lrd rule 1" in message
    assert up(1) in message
    assert f"the first {value}" in message
    assert "[3, 5]" in message
    assert up(0) not in message
    assert_unchanged(llama, before)


def test_plan_error_non_finite_conv1d_weight(captured):
    gm = copy.deepcopy(captured("gpt2"))
    with torch.no_grad():
        # Conv1D stores (in_features, out_features); the message indexes (out, in).
        gm.get_parameter("h.0.mlp.c_fc.weight")[5, 3] = float("nan")
    before = snapshot(gm)

    with pytest.raises(PlanError) as info:
        surgeon_fx.compress(gm, rules({"roles": ["mlp_up"], "rank": 4}))

    message = str(info.value)
    assert "h.0.mlp.c_fc" in message
    assert "nan at index [3, 5]" in message
    assert_unchanged(gm, before)


def test_plan_full_rank_ignores_non_finite_weight(llama):
    # A "full" rank leaves the site as it is, so its weight is not read.
    with torch.no_grad():
        llama.get_parameter(f"{up(1)}.weight")[0, 0] = float("nan")

    surgeon_fx.compress(llama, rules({"roles": ["mlp_up"], "rank": "full"}))

    assert lrd_modules(llama) == {}


# name -> (file name, file bytes or None for "create nothing", message substrings)
INVALID_FILES = {
    "missing": ("missing.toml", None, ["missing.toml", "cannot read plan file", "No such file"]),
    "directory": ("folder.toml", "mkdir", ["folder.toml", "cannot read plan file"]),
    "not_utf8": ("binary.toml", b"\xff\xfe\x00lrd", ["binary.toml", "not UTF-8"]),
    "invalid_toml": ("bad.toml", b"[[lrd]\nrank = 4\n", ["bad.toml", "not valid TOML"]),
    "invalid_json": ("bad.json", b'{"lrd": [', ["bad.json", "not valid JSON"]),
    "json_not_mapping": ("list.json", b"[1, 2]", ["must be a mapping", "list"]),
    "toml_rank_zero": ("zero.toml", b'[[lrd]]\nroles = ["q"]\nrank = 0\n', ["lrd rule 0", "got 0"]),
}


@pytest.mark.parametrize("case", sorted(INVALID_FILES))
def test_plan_error_from_file(case, tmp_path, llama):
    name, content, expected = INVALID_FILES[case]
    path = tmp_path / name
    if content == "mkdir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    before = snapshot(llama)

    with pytest.raises(PlanError) as info:
        surgeon_fx.compress(llama, path)

    message = str(info.value)
    for text in expected:
        assert text in message
    assert_unchanged(llama, before)


def test_plan_error_wrong_type(llama):
    before = snapshot(llama)

    with pytest.raises(PlanError, match="got int"):
        surgeon_fx.compress(llama, 42)

    assert_unchanged(llama, before)
