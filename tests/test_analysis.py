"""Tests for ``surgeon_fx.analyze``: roles, layers and head geometry from graph structure.

The expected tables are written by hand from each family's architecture, not
read from the library: every linear site of every layer with its role and shape,
and the head geometry of every attention operation.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import fx, nn

import surgeon_fx
from models import CASES, minilm
from surgeon_fx import AnalysisError, SurgeonWarning
from user_models import MLPOnly, UserBlock, user_transformer

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# Per-layer sites as "path with {i}": (role, in_features, out_features).
LLAMA_LAYER = {
    "layers.{i}.self_attn.q_proj": ("q", 64, 64),
    "layers.{i}.self_attn.k_proj": ("k", 64, 32),
    "layers.{i}.self_attn.v_proj": ("v", 64, 32),
    "layers.{i}.self_attn.o_proj": ("attn_out", 64, 64),
    "layers.{i}.mlp.gate_proj": ("mlp_gate", 64, 128),
    "layers.{i}.mlp.up_proj": ("mlp_up", 64, 128),
    "layers.{i}.mlp.down_proj": ("mlp_down", 128, 64),
}
BERT_LAYER = {
    "encoder.layer.{i}.attention.self.query": ("q", 64, 64),
    "encoder.layer.{i}.attention.self.key": ("k", 64, 64),
    "encoder.layer.{i}.attention.self.value": ("v", 64, 64),
    "encoder.layer.{i}.attention.output.dense": ("attn_out", 64, 64),
    "encoder.layer.{i}.intermediate.dense": ("mlp_up", 64, 128),
    "encoder.layer.{i}.output.dense": ("mlp_down", 128, 64),
}
GPT2_LAYER = {
    "h.{i}.attn.c_attn": ("qkv", 64, 192),
    "h.{i}.attn.c_proj": ("attn_out", 64, 64),
    "h.{i}.mlp.c_fc": ("mlp_up", 64, 256),
    "h.{i}.mlp.c_proj": ("mlp_down", 256, 64),
}
VIT_LAYER = {
    "layers.{i}.attention.q_proj": ("q", 64, 64),
    "layers.{i}.attention.k_proj": ("k", 64, 64),
    "layers.{i}.attention.v_proj": ("v", 64, 64),
    "layers.{i}.attention.o_proj": ("attn_out", 64, 64),
    "layers.{i}.mlp.fc1": ("mlp_up", 64, 128),
    "layers.{i}.mlp.fc2": ("mlp_down", 128, 64),
}
PHI3_LAYER = {
    # qkv: (4 heads + 2 * 2 kv heads) * 16; gate_up: 2 * 128.
    "layers.{i}.self_attn.qkv_proj": ("qkv", 64, 128),
    "layers.{i}.self_attn.o_proj": ("attn_out", 64, 64),
    "layers.{i}.mlp.gate_up_proj": ("mlp_gate_up", 64, 256),
    "layers.{i}.mlp.down_proj": ("mlp_down", 128, 64),
}
USER_ATTENTION = {
    "blocks.{i}.attn.query": ("q", 32, 32),
    "blocks.{i}.attn.key": ("k", 32, 32),
    "blocks.{i}.attn.value": ("v", 32, 32),
    "blocks.{i}.attn.out": ("attn_out", 32, 32),
}
USER_LAYER = {
    # F.gelu between two Linear attributes.
    "sdpa": {**USER_ATTENTION, "blocks.{i}.fc_in": ("mlp_up", 32, 128), "blocks.{i}.fc_out": ("mlp_down", 128, 32)},
    # nn.Sequential(Linear, GELU, Dropout, Linear).
    "matmul": {**USER_ATTENTION, "blocks.{i}.mlp.0": ("mlp_up", 32, 128), "blocks.{i}.mlp.3": ("mlp_down", 128, 32)},
}
MINILM_LAYER = {
    "encoder.layer.{i}.attention.self.query": ("q", 384, 384),
    "encoder.layer.{i}.attention.self.key": ("k", 384, 384),
    "encoder.layer.{i}.attention.self.value": ("v", 384, 384),
    "encoder.layer.{i}.attention.output.dense": ("attn_out", 384, 384),
    "encoder.layer.{i}.intermediate.dense": ("mlp_up", 384, 1536),
    "encoder.layer.{i}.output.dense": ("mlp_down", 1536, 384),
}


def expand(per_layer: dict, layers: int, other: dict | None = None) -> dict:
    """Return ``{path: (role, layer, in_features, out_features)}`` for ``layers`` blocks."""
    table = {}
    for i in range(layers):
        for template, (role, fan_in, fan_out) in per_layer.items():
            table[template.format(i=i)] = (role, i, fan_in, fan_out)
    for path, (role, fan_in, fan_out) in (other or {}).items():
        table[path] = (role, None, fan_in, fan_out)
    return table


SITES = {
    "llama": expand(LLAMA_LAYER, 2),
    "llama_eager": expand(LLAMA_LAYER, 2),
    "qwen2": expand(LLAMA_LAYER, 2),
    "bert": expand(BERT_LAYER, 2, {"pooler.dense": ("other", 64, 64)}),
    "bert_eager": expand(BERT_LAYER, 2, {"pooler.dense": ("other", 64, 64)}),
    "gpt2": expand(GPT2_LAYER, 2),
    "vit": expand(VIT_LAYER, 2, {"pooler.dense": ("other", 64, 64)}),
    "phi3": expand(PHI3_LAYER, 2),
}

# name -> (kind, num_heads, num_kv_heads, head_dim, rotary, fused qkv)
GEOMETRY = {
    "llama": ("sdpa", 4, 2, 16, True, False),
    "llama_eager": ("eager", 4, 2, 16, True, False),
    "qwen2": ("sdpa", 4, 2, 16, True, False),
    "bert": ("sdpa", 4, 4, 16, False, False),
    "bert_eager": ("eager", 4, 4, 16, False, False),
    "gpt2": ("sdpa", 4, 4, 16, False, True),
    "vit": ("sdpa", 4, 4, 16, False, False),
    "phi3": ("sdpa", 4, 2, 16, True, True),
}


@pytest.fixture(scope="module")
def analyses():
    """Capture and analyse each case once: ``name -> Analysis``."""
    cache = {}

    def get(name: str) -> surgeon_fx.Analysis:
        if name not in cache:
            model, args, kwargs = CASES[name].make()
            cache[name] = surgeon_fx.analyze(surgeon_fx.capture(model, args, kwargs))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def minilm_analysis():
    model = minilm()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    return surgeon_fx.analyze(surgeon_fx.capture(model, (ids,)))


def site_table(analysis: surgeon_fx.Analysis) -> dict:
    return {s.path: (s.role, s.layer, s.in_features, s.out_features) for s in analysis.sites}


def assert_sites(analysis: surgeon_fx.Analysis, expected: dict) -> None:
    actual = site_table(analysis)
    assert sorted(actual) == sorted(expected), "site paths differ"
    for path, row in expected.items():
        assert actual[path] == row, path


def assert_attention(analysis, per_layer: dict, layers: list, geometry: tuple) -> None:
    """Check one attention op per layer, its q/k/v/out sites and head geometry."""
    kind, heads, kv_heads, head_dim, rotary, fused = geometry
    assert [op.layer for op in analysis.attention] == layers
    paths_by_role = {role: template for template, (role, _, _) in per_layer.items()}
    for op, layer in zip(analysis.attention, layers):
        where = f"layer {layer}"
        assert op.kind == kind, where
        assert op.num_heads == heads, where
        assert op.num_kv_heads == kv_heads, where
        assert op.head_dim == head_dim, where
        assert op.rotary is rotary, where
        assert op.fused_qkv is fused, where
        for attr, role in (("q", "q"), ("k", "k"), ("v", "v"), ("out", "attn_out")):
            role = "qkv" if fused and attr in "qkv" else role
            assert getattr(op, attr).path == paths_by_role[role].format(i=layer), f"{where} {attr}"


@pytest.mark.parametrize("name", sorted(SITES))
def test_analyze_site_roles(name, analyses):
    assert_sites(analyses(name), SITES[name])


@pytest.mark.parametrize("name", sorted(GEOMETRY))
def test_analyze_attention_geometry(name, analyses):
    per_layer = {
        "llama": LLAMA_LAYER, "llama_eager": LLAMA_LAYER, "qwen2": LLAMA_LAYER, "bert": BERT_LAYER,
        "bert_eager": BERT_LAYER, "gpt2": GPT2_LAYER, "vit": VIT_LAYER, "phi3": PHI3_LAYER,
    }[name]

    assert_attention(analyses(name), per_layer, [0, 1], GEOMETRY[name])


def test_analyze_qwen2_qkv_bias(analyses):
    analysis = analyses("qwen2")

    for layer in (0, 1):
        prefix = f"layers.{layer}"
        for name in ("q_proj", "k_proj", "v_proj"):
            assert analysis.site(f"{prefix}.self_attn.{name}").has_bias, name
        assert not analysis.site(f"{prefix}.self_attn.o_proj").has_bias
        assert not analysis.site(f"{prefix}.mlp.down_proj").has_bias


def test_analyze_gpt2_conv1d_layout(analyses):
    analysis = analyses("gpt2")
    site = analysis.site("h.0.attn.c_attn")

    # Conv1D stores its weight as (in_features, out_features).
    stored, _ = site.tensors(analysis.gm)
    assert tuple(stored.shape) == (64, 192)
    assert tuple(site.weight(analysis.gm).shape) == (192, 64)


def test_analyze_minilm_sites(minilm_analysis):
    expected = expand(MINILM_LAYER, 6, {"pooler.dense": ("other", 384, 384)})

    assert_sites(minilm_analysis, expected)
    assert minilm_analysis.layers == [0, 1, 2, 3, 4, 5]


def test_analyze_minilm_geometry(minilm_analysis):
    assert_attention(minilm_analysis, MINILM_LAYER, list(range(6)), ("sdpa", 12, 12, 32, False, False))
    # hidden = heads * head_dim = 384
    for op in minilm_analysis.attention:
        assert op.num_heads * op.head_dim == 384


@pytest.mark.parametrize("kind", ["sdpa", "matmul"])
@pytest.mark.parametrize("with_shapes", [True, False])
def test_analyze_user_transformer(kind, with_shapes):
    model, ids = user_transformer(kind)
    traced = fx.symbolic_trace(model)
    gm = surgeon_fx.capture(traced, (ids,) if with_shapes else ())

    analysis = surgeon_fx.analyze(gm)

    assert_sites(analysis, expand(USER_LAYER[kind], 2, {"head": ("other", 32, 50)}))
    geometry = ("sdpa" if kind == "sdpa" else "eager", 4, 4, 8, False, False)
    assert_attention(analysis, USER_LAYER[kind], [0, 1], geometry)


@pytest.mark.parametrize("kind", ["sdpa", "matmul"])
def test_analyze_user_transformer_exported(kind):
    model, ids = user_transformer(kind)

    analysis = surgeon_fx.analyze(surgeon_fx.capture(model, (ids,)))

    assert_sites(analysis, expand(USER_LAYER[kind], 2, {"head": ("other", 32, 50)}))
    geometry = ("sdpa" if kind == "sdpa" else "eager", 4, 4, 8, False, False)
    assert_attention(analysis, USER_LAYER[kind], [0, 1], geometry)


def test_analyze_single_block_has_no_layers():
    # Outside a repeated block, the index of an nn.Sequential ("mlp.0") is no layer.
    torch.manual_seed(0)
    block = UserBlock(32, 4, "matmul").eval()
    gm = surgeon_fx.capture(fx.symbolic_trace(block), (torch.randn(2, 8, 32),))

    analysis = surgeon_fx.analyze(gm)

    expected = {
        "attn.query": ("q", None, 32, 32),
        "attn.key": ("k", None, 32, 32),
        "attn.value": ("v", None, 32, 32),
        "attn.out": ("attn_out", None, 32, 32),
        "mlp.0": ("mlp_up", None, 32, 128),
        "mlp.3": ("mlp_down", None, 128, 32),
    }
    assert_sites(analysis, expected)
    assert analysis.layers == []


def test_analyze_transformer_encoder_layer():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True).eval()
    x = torch.randn(2, 8, 32)

    analysis = surgeon_fx.analyze(surgeon_fx.capture(layer, (x,)))

    expected = {
        "self_attn.in_proj": ("qkv", None, 32, 96),
        "self_attn.out_proj": ("attn_out", None, 32, 32),
        "linear1": ("mlp_up", None, 32, 64),
        "linear2": ("mlp_down", None, 64, 32),
    }
    assert_sites(analysis, expected)
    assert len(analysis.attention) == 1
    op = analysis.attention[0]
    assert (op.num_heads, op.num_kv_heads, op.head_dim, op.rotary) == (4, 4, 8, False)
    assert op.fused_qkv
    assert op.out.path == "self_attn.out_proj"


def test_analyze_mlp_only_warns():
    model = MLPOnly().eval()
    gm = surgeon_fx.capture(model, (torch.randn(2, 8),))

    with pytest.warns(SurgeonWarning, match="no attention operation"):
        analysis = surgeon_fx.analyze(gm)

    assert {s.path: s.role for s in analysis.sites} == {"up": "other", "down": "other", "classifier": "other"}
    assert analysis.attention == []


def test_analyze_transformer_does_not_warn(analyses):
    gm = analyses("bert").gm

    with warnings.catch_warnings():
        warnings.simplefilter("error", SurgeonWarning)
        surgeon_fx.analyze(gm)


@pytest.mark.parametrize("name", ["llama", "gpt2", "phi3"])
def test_analyze_print_lists_every_path(name, analyses, capsys):
    analysis = analyses(name)

    print(analysis)

    printed = capsys.readouterr().out
    for path in SITES[name]:
        assert path in printed, path
    for role in {role for role, *_ in SITES[name].values()}:
        assert role in printed, role


def test_analyze_print_minilm(minilm_analysis, capsys):
    print(minilm_analysis)

    printed = capsys.readouterr().out
    for site in minilm_analysis.sites:
        assert site.path in printed
    assert "37 linear sites" in printed


def test_analyze_site_lookup(analyses):
    analysis = analyses("llama")

    assert analysis.site("layers.1.mlp.gate_proj").role == "mlp_gate"
    with pytest.raises(AnalysisError, match="layers.9.mlp.gate_proj"):
        analysis.site("layers.9.mlp.gate_proj")


def test_analyze_rejects_module():
    model, _, _ = CASES["bert"].make()

    with pytest.raises(AnalysisError, match="BertModel.*surgeon_fx.capture"):
        surgeon_fx.analyze(model)
