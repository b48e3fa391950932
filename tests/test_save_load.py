"""save / load: safetensors weights and a JSON manifest, rebuilt on a fresh base model."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from causal_lms import assert_state_equal, causal_lm, generate, logits, state_snapshot, token_ids

import surgeon_fx
from surgeon_fx import CheckpointError, LinearLRD, MaskedLinear
from surgeon_fx.live import journal_of_model

LRD = {"lrd": [{"roles": ["q", "k", "v", "attn_out", "mlp_down"], "rank": 8}]}
PRUNE = {"prune": [{"unit": "heads", "ratio": 0.5, "layers": [0]}, {"unit": "mlp_neurons", "ratio": 0.25}]}
MIXED = {**LRD, **PRUNE}
PLANS = {"lrd": LRD, "pruned": PRUNE, "mixed": MIXED}


def compressed(name: str, plan: dict, hard: bool):
    model, ids = causal_lm(name), token_ids()
    surgeon_fx.compress_model(model, plan, (ids,), hard=hard)
    return model, ids


@pytest.mark.filterwarnings("ignore::surgeon_fx.SurgeonWarning")
@pytest.mark.parametrize("kind", ["lrd", "pruned", "mixed"])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_save_load_gives_identical_outputs(tmp_path, kind, hard):
    model, ids = compressed("llama", PLANS[kind], hard)
    surgeon_fx.save(model, tmp_path)

    fresh = causal_lm("llama", seed=1)
    surgeon_fx.load(tmp_path, fresh)
    assert torch.equal(logits(fresh, ids), logits(model, ids))
    if kind == "mixed":
        assert torch.equal(generate(fresh, ids), generate(model, ids))
    assert journal_of_model(fresh).state == ("hard" if hard else "soft")
    assert [type(m).__name__ for m in fresh.modules()] == [type(m).__name__ for m in model.modules()]


def test_load_soft_then_restore_gives_fresh_base(tmp_path):
    model, ids = compressed("qwen2", MIXED, hard=False)
    surgeon_fx.save(model, tmp_path)
    fresh = causal_lm("qwen2")
    original_q = fresh.model.layers[0].self_attn.q_proj
    surgeon_fx.load(tmp_path, fresh)
    assert isinstance(fresh.model.layers[0].self_attn.q_proj, MaskedLinear)
    surgeon_fx.restore_model(fresh)
    assert fresh.model.layers[0].self_attn.q_proj is original_q


def test_load_hard_sets_head_counts(tmp_path):
    model, ids = compressed("qwen2", {"prune": [{"unit": "heads", "ratio": 0.5}]}, hard=True)
    surgeon_fx.save(model, tmp_path)
    fresh = causal_lm("qwen2")
    surgeon_fx.load(tmp_path, fresh)
    assert fresh.config.num_attention_heads == 2
    assert fresh.model.layers[0].self_attn.num_key_value_groups == 2
    assert torch.equal(generate(fresh, ids), generate(model, ids))


def test_manifest_contents(tmp_path):
    model, _ = compressed("llama", MIXED, hard=False)
    surgeon_fx.save(model, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["architecture"] == "LlamaForCausalLM"
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["surgeon_fx"] == surgeon_fx.__version__
    assert manifest["plan"]["lrd"][0]["rank"] == 8
    site = next(s for s in manifest["sites"] if s["path"] == "model.layers.0.self_attn.q_proj")
    assert site["original"] == {"in_features": 64, "out_features": 64, "bias": False}
    assert site["module"]["kind"] == "masked"
    assert site["module"]["inner"] == {
        "kind": "lrd", "in_features": 64, "out_features": 64, "rank": 8, "bias": False, "dtype": "float32",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "model.safetensors"]


def test_graph_module_save_load(tmp_path):
    model, ids = causal_lm("llama"), token_ids()
    gm = surgeon_fx.capture(model, (ids,), dynamic=False)
    surgeon_fx.compress(gm, LRD)
    surgeon_fx.save(gm, tmp_path)
    fresh_gm = surgeon_fx.capture(causal_lm("llama", seed=1), (ids,), dynamic=False)
    surgeon_fx.load(tmp_path, fresh_gm)
    assert isinstance(fresh_gm.get_submodule("model.layers.0.self_attn.q_proj"), LinearLRD)
    assert torch.equal(fresh_gm(ids)[0], gm(ids)[0])
    assert fresh_gm.code == gm.code


def test_tied_head_round_trip(tmp_path):
    model, ids = causal_lm("qwen2", tie_word_embeddings=True), token_ids()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    surgeon_fx.compress_model(model, {"lrd": [{"roles": ["mlp_down", "other"], "rank": 8}]}, (ids,))
    surgeon_fx.save(model, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert "lm_head" in [s["path"] for s in manifest["sites"]]
    fresh = causal_lm("qwen2", seed=1, tie_word_embeddings=True)
    surgeon_fx.load(tmp_path, fresh)
    assert torch.equal(logits(fresh, ids), logits(model, ids))
    assert torch.equal(fresh.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_uncompressed_model_round_trip(tmp_path):
    model, ids = causal_lm("llama"), token_ids()
    surgeon_fx.save(model, tmp_path)
    fresh = causal_lm("llama", seed=1)
    surgeon_fx.load(tmp_path, fresh)
    assert torch.equal(logits(fresh, ids), logits(model, ids))
    assert journal_of_model(fresh) is None


# --- Bad inputs: CheckpointError, and the model is unchanged ----------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A soft, mixed (pruned and decomposed) Llama checkpoint, saved once for the error tests."""
    directory = tmp_path_factory.mktemp("checkpoint")
    model, _ = compressed("llama", MIXED, hard=False)
    surgeon_fx.save(model, directory)
    return directory


def load_rejected(directory, model, message):
    before = state_snapshot(model)
    modules = dict(model.named_modules())
    with pytest.raises(CheckpointError, match=message):
        surgeon_fx.load(directory, model)
    assert_state_equal(model, before)
    assert all(module is modules[path] for path, module in model.named_modules())
    assert journal_of_model(model) is None


def copy_checkpoint(saved, tmp_path):
    for name in ("manifest.json", "model.safetensors"):
        (tmp_path / name).write_bytes((saved / name).read_bytes())
    return tmp_path


def test_missing_directory_rejected(tmp_path):
    load_rejected(tmp_path / "absent", causal_lm("llama"), r"absent/manifest.json' not found")


def test_missing_weights_rejected(saved, tmp_path):
    directory = copy_checkpoint(saved, tmp_path)
    (directory / "model.safetensors").unlink()
    load_rejected(directory, causal_lm("llama"), r"model.safetensors' not found")


def test_other_architecture_rejected(saved):
    load_rejected(saved, causal_lm("qwen2"), "saved from a LlamaForCausalLM but the model is a Qwen2ForCausalLM")


def test_other_sizes_rejected(saved):
    model = causal_lm("llama", intermediate_size=96)
    load_rejected(saved, model, r"site 'model.layers.0.mlp.gate_proj': the checkpoint's original layer is 128x64")


def test_manifest_rank_mismatch_rejected(saved, tmp_path):
    directory = copy_checkpoint(saved, tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    site = next(s for s in manifest["sites"] if s["path"] == "model.layers.1.mlp.down_proj")
    site["module"]["inner"]["rank"] = 6
    (directory / "manifest.json").write_text(json.dumps(manifest))
    load_rejected(directory, causal_lm("llama"), "manifest.json' changed since it was saved")
    # A checkpoint written before checksums is not checked, so the shapes must catch the edit.
    weights = safetensors.torch.load_file(directory / "model.safetensors")
    safetensors.torch.save_file(weights, directory / "model.safetensors", metadata={"format": "surgeon_fx.checkpoint/1"})
    load_rejected(directory, causal_lm("llama"), r"'model.layers.1.mlp.down_proj.inner.v' has shape \[8, 128\] but the model expects \[6, 128\]")


def test_truncated_weights_rejected(saved, tmp_path):
    directory = copy_checkpoint(saved, tmp_path)
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    load_rejected(directory, causal_lm("llama"), "truncated or not a safetensors file")


def test_flipped_weight_bytes_rejected(saved, tmp_path):
    directory = copy_checkpoint(saved, tmp_path)
    data = bytearray((directory / "model.safetensors").read_bytes())
    data[-4:] = b"\xff\xff\xff\x7f"  # the last float becomes NaN; the file still parses
    (directory / "model.safetensors").write_bytes(bytes(data))
    load_rejected(directory, causal_lm("llama"), r"SHA-256 is [0-9a-f]{12}\.\.\., the manifest recorded")


EDITS = {
    "no state": (lambda m: m.pop("state"), r"field 'state' is None, expected one of \['none', 'soft', 'hard'\]"),
    "unknown state": (lambda m: m.update(state="Bogus"), r"field 'state' is 'Bogus'"),
    "no edits": (lambda m: m.pop("edits"), r"field 'edits' is None, expected a list"),
    "sites null": (lambda m: m.update(sites=None), r"field 'sites' is None"),
    "aliases null": (lambda m: m.update(aliases=None), r"field 'aliases' is None"),
    "unknown kind": (lambda m: m.update(kind="Bogus"), r"field 'kind' is 'Bogus'"),
    "no architecture": (lambda m: m.pop("architecture"), r"field 'architecture' is None, expected a str"),
    "site without module": (lambda m: m["sites"][0].pop("module"), r"site 0 needs a 'path', a 'module'"),
    "bad edit": (lambda m: m["edits"].append({"name": "x"}), r"edit \d+ needs 'target'"),
    "checksum not text": (lambda m: m.update(weights_sha256=7), r"field 'weights_sha256' is 7, expected a str"),
    "absolute weights path": (lambda m: m.update(weights="/tmp/model.safetensors"), r"expected a file name"),
    # Well-formed edits that would load into a model that cannot run:
    "edited count": (lambda m: m["edits"].append({"target": "model.layers.0.self_attn", "name": "head_dim",
                                                 "before": 16, "after": 3}), "changed since it was saved"),
    "state flipped": (lambda m: m.update(state="hard"), "changed since it was saved"),
    "dtype changed": (lambda m: m["sites"][0]["module"].update(dtype="float16"), "changed since it was saved"),
    "checksum removed": (lambda m: m.pop("weights_sha256"), "changed since it was saved"),
}


@pytest.mark.parametrize("change", EDITS, ids=list(EDITS))
def test_edited_manifest_rejected(saved, tmp_path, change):
    directory = copy_checkpoint(saved, tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    edit, message = EDITS[change]
    edit(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    load_rejected(directory, causal_lm("llama"), message)


def test_invalid_manifest_rejected(saved, tmp_path):
    directory = copy_checkpoint(saved, tmp_path)
    (directory / "manifest.json").write_text("{not json")
    load_rejected(directory, causal_lm("llama"), "is not valid JSON")


def test_compressed_model_rejected(saved):
    model, _ = compressed("llama", LRD, hard=False)
    with pytest.raises(CheckpointError, match="compressed already"):
        surgeon_fx.load(saved, model)


def test_pruned_graph_module_save_rejected(tmp_path):
    model, ids = causal_lm("llama"), token_ids()
    gm = surgeon_fx.capture(model, (ids,), dynamic=False)
    surgeon_fx.compress(gm, {"prune": [{"unit": "mlp_neurons", "ratio": 0.25}]})
    with pytest.raises(CheckpointError, match="only low-rank decomposition of a graph module can be saved"):
        surgeon_fx.save(gm, tmp_path)
    assert not (tmp_path / "manifest.json").exists()
