"""Tests for the coupling groups that structured pruning respects (``analysis.groups``).

Each tiny model of ``models.py`` is captured once. The checks read the groups found
in its graph: MLP neurons, heads (with grouped-query and fused projections), and the
hidden size with every embedding, norm and head that carries it.
"""

from __future__ import annotations

import networkx as nx
import pytest

import surgeon_fx
from models import CASES
from surgeon_fx.analysis.coupling import Slot, build_coupling_graph

NAMES = ["llama", "qwen2", "bert", "gpt2", "vit", "phi3"]


@pytest.fixture(scope="module")
def analysis_of():
    cache = {}

    def get(name: str):
        if name not in cache:
            model, args, kwargs = CASES[name].make()
            cache[name] = surgeon_fx.analyze(surgeon_fx.capture(model, args, kwargs))
        return cache[name]

    return get


def _groups(analysis, unit):
    return [g for g in analysis.groups if g.unit == unit]


@pytest.mark.parametrize("name", NAMES)
def test_groups_per_unit(name, analysis_of):
    analysis = analysis_of(name)
    case = CASES[name]

    assert len(_groups(analysis, "mlp_neurons")) == case.layers
    assert len(_groups(analysis, "heads")) == case.layers
    assert len(_groups(analysis, "hidden")) == 1
    assert all(g.unsupported is None for g in analysis.groups)


@pytest.mark.parametrize("name", NAMES)
def test_head_group_geometry(name, analysis_of):
    case = CASES[name]
    for group in _groups(analysis_of(name), "heads"):
        assert group.size == case.num_heads
        assert group.num_kv_heads == case.num_kv_heads
        assert group.head_dim == case.head_dim
        assert group.queries_per_kv == case.num_heads // case.num_kv_heads
        assert all(slot.width == case.head_dim for slot in group.slots)


def test_llama_gqa_kv_slots(analysis_of):
    group = _groups(analysis_of("llama"), "heads")[0]
    per = {slot.target.rsplit(".", 1)[-1]: slot.per for slot in group.slots}

    assert per == {"q_proj": "unit", "k_proj": "kv", "v_proj": "kv", "o_proj": "unit"}
    k_slot = next(s for s in group.slots if s.target.endswith("k_proj"))
    # Query heads 0 and 1 share kv head 0; keeping only head 1 keeps kv head 0.
    assert group.slot_indices(k_slot, [1]) == list(range(16))
    assert group.kept_kv_heads([1, 3]) == [0, 1]


@pytest.mark.parametrize("name, fused_path", [
    ("phi3", "layers.0.self_attn.qkv_proj"),
    ("gpt2", "h.0.attn.c_attn"),
])
def test_fused_qkv_sections(name, fused_path, analysis_of):
    case = CASES[name]
    group = _groups(analysis_of(name), "heads")[0]
    fused = [s for s in group.slots if s.target == fused_path]
    q_size = case.num_heads * case.head_dim
    kv_size = case.num_kv_heads * case.head_dim

    assert [s.offset for s in fused] == [0, q_size, q_size + kv_size]
    assert [s.per for s in fused] == ["unit", "kv", "kv"]


def test_phi3_gate_up_halves(analysis_of):
    group = _groups(analysis_of("phi3"), "mlp_neurons")[0]
    halves = [s for s in group.slots if s.target.endswith("gate_up_proj")]

    assert [s.offset for s in halves] == [0, group.size]
    assert group.slots[-1] == Slot("site", "layers.0.mlp.down_proj", "in")


def test_llama_mlp_group_sites(analysis_of):
    group = _groups(analysis_of("llama"), "mlp_neurons")[1]

    assert group.layer == 1
    assert {s.role for s in group.sites} == {"mlp_up", "mlp_gate", "mlp_down"}
    assert [str(s) for s in group.slots] == [
        "layers.1.mlp.up_proj[out]", "layers.1.mlp.gate_proj[out]", "layers.1.mlp.down_proj[in]",
    ]


def test_llama_hidden_members(analysis_of):
    hidden = _groups(analysis_of("llama"), "hidden")[0]
    targets = {(s.target, s.axis) for s in hidden.slots}

    assert ("embed_tokens.weight", 1) in targets
    assert ("norm.weight", 0) in targets
    for layer in (0, 1):
        assert (f"layers.{layer}.input_layernorm.weight", 0) in targets
        assert (f"layers.{layer}.self_attn.q_proj", "in") in targets
        assert (f"layers.{layer}.self_attn.o_proj", "out") in targets
        assert (f"layers.{layer}.mlp.down_proj", "out") in targets
    # Two RMSNorm means per layer, plus the final norm: 2 * 2 + 1.
    assert len(hidden.norm_nodes) == 5


def test_bert_hidden_members(analysis_of):
    hidden = _groups(analysis_of("bert"), "hidden")[0]
    targets = {(s.target, s.axis) for s in hidden.slots}

    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        assert (f"embeddings.{table}.weight", 1) in targets
    assert ("embeddings.LayerNorm.bias", 0) in targets
    assert ("pooler.dense", "in") in targets
    assert ("pooler.dense", "out") not in targets
    assert len(hidden.norm_nodes) == 5  # embeddings + 2 per layer


def test_vit_hidden_class_token(analysis_of):
    hidden = _groups(analysis_of("vit"), "hidden")[0]
    targets = {(s.target, s.axis) for s in hidden.slots}

    assert ("embeddings.cls_token", 2) in targets
    assert ("embeddings.position_embeddings", 2) in targets
    assert ("embeddings.patch_embeddings.projection.weight", 0) in targets
    assert ("layernorm.weight", 0) in targets


def test_coupling_graph_components(analysis_of):
    analysis = analysis_of("llama")
    graph = build_coupling_graph(analysis)

    assert isinstance(graph, nx.Graph)
    assert nx.number_connected_components(graph) == len(analysis.groups)


def test_group_prints_slots(analysis_of):
    group = _groups(analysis_of("llama"), "heads")[0]
    text = str(group)

    assert text.startswith("heads layer 0: 4 units (2 kv heads, head_dim 16)")
    assert "layers.0.self_attn.k_proj[out]  (width 16, per kv)" in text
