"""Save a compressed model and load it onto a fresh instance: :func:`save` and :func:`load`.

A checkpoint is a directory with two files:

- ``model.safetensors``: every tensor of ``state_dict()``. Tied tensors (such as an
  output head that shares the embedding) are stored once and listed as aliases.
- ``manifest.json``: the format version, the surgeon_fx, torch and transformers
  versions, the model's class name, the plan and the compression state. Per site it
  lists the structure of the new module (kind, shapes, rank, masks, dtype) and the
  shape of the original layer. Hard head and neuron pruning also lists the
  attributes it set on modules and on ``model.config``.

The weights file's metadata records the SHA-256 of the manifest, and the manifest
records the SHA-256 of the weights file, so an edit of either file after saving is
caught. :func:`load` reads both files, checks them against the model, builds every
new module, and only then changes the model. So a missing or changed file, a
manifest from another architecture, shapes that do not match or a truncated
weights file raise :class:`CheckpointError` with the model as it was. Loading
reads JSON and safetensors only, never pickle.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .errors import CheckpointError
from .layers import LinearLRD
from .live import (
    JOURNAL_ATTR,
    AttributeEdit,
    LiveJournal,
    MaskedLinear,
    ModuleSwap,
    _set_attribute,
    edit_owner,
    journal_of_model,
)
from .live_hidden import KeptChannelNorm, MaskedChannels, shrink
from .passes.manager import journal_of

logger = logging.getLogger(__name__)

FORMAT = "surgeon_fx.checkpoint/1"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model`` (compressed or not) to ``directory`` and return the directory.

    ``model`` is a live model compressed with :func:`~surgeon_fx.compress_model`, or a
    graph module compressed with :func:`~surgeon_fx.compress` by LRD.

    Raises:
        CheckpointError: the directory cannot be written, or ``model`` is a graph
            module whose graph was pruned (its rewritten shape constants are not
            a module structure that a manifest can describe).
    """
    directory = Path(directory)
    if isinstance(model, fx.GraphModule):
        sites, state, plan, extra = _graph_structure(model)
    else:
        sites, state, plan, extra = _live_structure(model)
    tensors, aliases = _dedup_tensors(model.state_dict())
    manifest = {
        "format": FORMAT,
        "versions": _versions(),
        "architecture": type(model).__name__,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "kind": "graph_module" if isinstance(model, fx.GraphModule) else "module",
        "state": state,
        "plan": plan,
        "sites": sites,
        "aliases": aliases,
        "weights": WEIGHTS,
        **extra,
    }
    try:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        metadata = {"format": FORMAT, "manifest_sha256": _manifest_digest(manifest)}
        save_file(tensors, str(directory / WEIGHTS), metadata=metadata)
        manifest["weights_sha256"] = _sha256(directory / WEIGHTS)
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    except OSError as err:
        raise CheckpointError(f"cannot write the checkpoint to {str(directory)!r}: {err.strerror}") from err
    logger.info("saved %s (%s, %d sites) to %s", type(model).__name__, state, len(sites), directory)
    return directory


def load(directory: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Rebuild the compressed structure saved in ``directory`` on ``model`` and load the weights.

    ``model`` is a fresh instance of the base model (same class and sizes, as from
    ``from_config`` or ``from_pretrained``), or a fresh capture of it for a checkpoint
    of a graph module. After loading, a soft checkpoint can be restored with
    :func:`~surgeon_fx.restore_model`, which puts back ``model``'s own modules.

    Raises:
        CheckpointError: a file is missing or unreadable, the manifest is from another
            architecture or format, ``model`` is compressed already, or a site or
            tensor shape does not match. ``model`` is then unchanged.
    """
    directory = Path(directory)
    manifest = _read_manifest(directory)
    _check_architecture(manifest, model)
    weights_path = directory / manifest.get("weights", WEIGHTS)
    weights, metadata = _read_weights(weights_path)
    _check_checksums(directory / MANIFEST, manifest, weights_path, metadata)
    for alias, name in manifest.get("aliases", {}).items():
        if name not in weights:
            raise CheckpointError(f"{WEIGHTS} lacks {name!r}, which alias {alias!r} points to; save the model again")
        weights[alias] = weights[name]
    if manifest["kind"] == "graph_module":
        return _load_graph(manifest, weights, model)
    return _load_live(manifest, weights, model)


# --- Describing the structure --------------------------------------------------------------


def _live_structure(model: nn.Module) -> tuple[list, str, Any, dict]:
    journal = journal_of_model(model)
    if journal is None:
        return [], "none", None, {"edits": []}
    rows = {row["path"]: row for row in journal.rewrites}
    sites = []
    for swap in journal.swaps:
        row = rows[swap.path]
        if "shapes" in row:  # a norm, embedding or convolution changed by hidden-size pruning
            original = {"class": row["class"], "shapes": row["shapes"]}
        else:
            original = {"in_features": row["in_features"], "out_features": row["out_features"], "bias": row["bias"]}
        sites.append({"path": swap.path, "original": original, "module": _describe(model.get_submodule(swap.path))})
    edits = [{"target": e.target, "name": e.name, "before": e.before, "after": e.after} for e in journal.edits]
    return sites, journal.state, journal.plan, {"edits": edits, "notes": journal.notes, "rewrites": journal.rewrites}


def _graph_structure(gm: fx.GraphModule) -> tuple[list, str, Any, dict]:
    journal = journal_of(gm)
    others = sorted({e.pass_name for e in journal.entries if not e.pass_name.startswith("decompose_linear")})
    if others:
        # NOTE: hard pruning of a graph module rewrites shape constants in the graph,
        # which this manifest does not describe; only LRD graph modules are saved.
        raise CheckpointError(
            f"cannot save a graph module changed by the passes {others}: only low-rank decomposition "
            "of a graph module can be saved. Prune the live model with surgeon_fx.compress_model() "
            "and save that instead"
        )
    sites = []
    for row in journal.rewrites:
        module = gm.get_submodule(row["path"])
        sites.append({
            "path": row["path"],
            "original": {"in_features": module.in_features, "out_features": module.out_features,
                         "bias": module.bias is not None},
            "module": _describe(module),
        })
    return sites, journal.state, journal.plan, {"edits": [], "rewrites": journal.rewrites}


def _describe(module: nn.Module) -> dict[str, Any]:
    """Return the structure of a module that compression put in, as JSON data."""
    if isinstance(module, KeptChannelNorm):
        return {"kind": "kept_norm", "size": module.size, "kept": module.index.numel(), "inner": _describe(module.inner)}
    if isinstance(module, MaskedChannels):
        return {"kind": "masked_channels", "size": module.mask.numel(), "dim": module.dim, "inner": _describe(module.inner)}
    if not isinstance(module, (MaskedLinear, LinearLRD, nn.Linear)):  # a smaller norm, embedding or convolution
        return {"kind": "resized", "class": type(module).__name__,
                "shapes": {name: list(p.shape) for name, p in module.named_parameters(recurse=False)}}
    dtype = str(next(module.parameters()).dtype).removeprefix("torch.")
    if isinstance(module, MaskedLinear):
        return {
            "kind": "masked", "in_features": module.in_features, "out_features": module.out_features,
            "in_mask": module.in_mask is not None, "out_mask": module.out_mask is not None,
            "inner": _describe(module.inner), "dtype": dtype,
        }
    if isinstance(module, LinearLRD):
        return {
            "kind": "lrd", "in_features": module.in_features, "out_features": module.out_features,
            "rank": "full" if module.rank is None else module.rank, "bias": module.bias is not None, "dtype": dtype,
        }
    if isinstance(module, nn.Linear):
        return {
            "kind": "linear", "in_features": module.in_features, "out_features": module.out_features,
            "bias": module.bias is not None, "dtype": dtype,
        }
    raise CheckpointError(f"cannot describe a {type(module).__name__} put in by compression; save is out of date")


def _build(spec: dict[str, Any], device: torch.device, where: str, base: nn.Module | None = None) -> nn.Module:
    """Return an empty module of the structure ``spec`` describes.

    ``base`` is the model's module at that path, which a resized norm, embedding or
    convolution is copied from.
    """
    try:
        kind = spec["kind"]
        if kind in ("kept_norm", "masked_channels", "resized"):
            return _build_resized(spec, where, base)
        dtype = getattr(torch, spec["dtype"])
        in_features, out_features = int(spec["in_features"]), int(spec["out_features"])
        if kind == "lrd":
            rank = None if spec["rank"] == "full" else int(spec["rank"])
            return LinearLRD(in_features, out_features, rank, bias=bool(spec["bias"]), device=device, dtype=dtype)
        if kind == "linear":
            return nn.Linear(in_features, out_features, bias=bool(spec["bias"]), device=device, dtype=dtype)
        if kind == "masked":
            inner = _build(spec["inner"], device, where)
            in_mask = torch.zeros(in_features, device=device, dtype=dtype) if spec["in_mask"] else None
            out_mask = torch.zeros(out_features, device=device, dtype=dtype) if spec["out_mask"] else None
            return MaskedLinear(inner, in_mask, out_mask)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{MANIFEST}: invalid module structure at {where}: {spec!r} ({err})") from err
    raise CheckpointError(
        f"{MANIFEST}: unknown module kind {kind!r} at {where}; expected lrd, linear, masked, kept_norm, "
        "masked_channels or resized"
    )


def _build_resized(spec: dict[str, Any], where: str, base: nn.Module) -> nn.Module:
    """Return a norm, embedding or convolution at the sizes of ``spec``, copied from ``base``."""
    kind = spec["kind"]
    if kind == "kept_norm":
        size, kept = int(spec["size"]), int(spec["kept"])
        return KeptChannelNorm(_build_resized(spec["inner"], where, base), list(range(kept)), size)
    if kind == "masked_channels":
        mask = torch.zeros(int(spec["size"]), dtype=next(base.parameters()).dtype, device=next(base.parameters()).device)
        return MaskedChannels(copy.deepcopy(base), mask, int(spec["dim"]))
    params = dict(base.named_parameters(recurse=False))
    kept_by_param = {}
    for name, shape in spec["shapes"].items():
        if name not in params or len(shape) != params[name].dim():
            raise CheckpointError(f"{MANIFEST}: {where} has no parameter {name!r} of {len(shape)} dims to resize")
        dims = [d for d in range(len(shape)) if shape[d] != params[name].shape[d]]
        if len(dims) > 1 or any(shape[d] > params[name].shape[d] for d in dims):
            raise CheckpointError(f"{MANIFEST}: {where}.{name} cannot be resized to {shape}")
        if dims:
            kept_by_param[name] = (dims[0], list(range(shape[dims[0]])))
    return shrink(base, kept_by_param)


# --- Reading and checking -------------------------------------------------------------------


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError as err:
        raise CheckpointError(f"{str(path)!r} not found; save the model with surgeon_fx.save() first") from err
    except OSError as err:
        raise CheckpointError(f"cannot read {str(path)!r}: {err.strerror}") from err
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({err}); save the model again") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{str(path)!r} has format {found!r}, expected {FORMAT!r}")
    _check_fields(manifest, path)
    return manifest


# Fields of a manifest: name -> (allowed types, or allowed values as a tuple of strings).
_FIELDS: dict[str, Any] = {
    "architecture": str,
    "kind": ("module", "graph_module"),
    "state": ("none", "soft", "hard"),
    "sites": list,
    "aliases": dict,
    "weights": str,
}
# Optional fields: name -> type.
_OPTIONAL_FIELDS = {"weights_sha256": str}


def _check_fields(manifest: dict[str, Any], path: Path) -> None:
    """Raise CheckpointError for a missing or mistyped field, before anything is built."""
    fields = dict(_FIELDS, edits=list) if manifest.get("kind") == "module" else _FIELDS
    for name, allowed in fields.items():
        value = manifest.get(name)
        valid = value in allowed if isinstance(allowed, tuple) else isinstance(value, allowed)
        if not valid:
            expected = f"one of {list(allowed)}" if isinstance(allowed, tuple) else f"a {allowed.__name__}"
            raise CheckpointError(
                f"{str(path)!r}: field {name!r} is {value!r}, expected {expected}; the manifest was edited "
                "or damaged, so save the model again"
            )
    for name, allowed in _OPTIONAL_FIELDS.items():
        if name in manifest and not isinstance(manifest[name], allowed):
            raise CheckpointError(
                f"{str(path)!r}: field {name!r} is {manifest[name]!r}, expected a {allowed.__name__}; "
                "save the model again"
            )
    if Path(manifest["weights"]).name != manifest["weights"]:
        raise CheckpointError(
            f"{str(path)!r}: field 'weights' is {manifest['weights']!r}, expected a file name in the "
            "checkpoint's directory; save the model again"
        )
    for index, site in enumerate(manifest["sites"]):
        if not (isinstance(site, dict) and isinstance(site.get("path"), str)
                and isinstance(site.get("module"), dict) and isinstance(site.get("original"), dict)):
            raise CheckpointError(
                f"{str(path)!r}: site {index} needs a 'path', a 'module' and an 'original'; save the model again"
            )
    for index, edit in enumerate(manifest.get("edits", [])):
        if not (isinstance(edit, dict) and {"target", "name", "before", "after"} <= set(edit)):
            raise CheckpointError(
                f"{str(path)!r}: edit {index} needs 'target', 'name', 'before' and 'after'; save the model again"
            )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_digest(manifest: dict[str, Any]) -> str:
    """Return the SHA-256 of the manifest's content, leaving out the weights checksum written after it."""
    body = {key: value for key, value in manifest.items() if key != "weights_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_checksums(manifest_path: Path, manifest: dict[str, Any], path: Path, metadata: dict[str, str]) -> None:
    """Check that neither file changed since :func:`save` wrote them.

    The weights file's metadata records the SHA-256 of the manifest, and the
    manifest records the SHA-256 of the weights file. Checkpoints from before checksums have
    neither and are not checked.
    """
    recorded = metadata.get("manifest_sha256")
    if recorded is None:
        return
    if recorded != _manifest_digest(manifest) or not isinstance(manifest.get("weights_sha256"), str):
        raise CheckpointError(
            f"{str(manifest_path)!r} changed since it was saved (its SHA-256 no longer matches the one "
            "recorded in the weights file); save the model again"
        )
    expected = manifest["weights_sha256"]
    try:
        found = _sha256(path)
    except FileNotFoundError as err:
        raise CheckpointError(f"{str(path)!r} not found; save the model again") from err
    except OSError as err:
        raise CheckpointError(f"cannot read {str(path)!r}: {err.strerror}; save the model again") from err
    if found != expected:
        raise CheckpointError(
            f"{str(path)!r} changed since it was saved: its SHA-256 is {found[:12]}..., the manifest "
            f"recorded {expected[:12]}...; save the model again"
        )


def _check_architecture(manifest: dict[str, Any], model: nn.Module) -> None:
    expected = manifest.get("architecture")
    if expected != type(model).__name__:
        raise CheckpointError(
            f"the checkpoint was saved from a {expected} but the model is a {type(model).__name__}; "
            f"load it into a fresh {expected}"
        )
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if manifest.get("model_type") != model_type:
        raise CheckpointError(
            f"the checkpoint was saved from model_type {manifest.get('model_type')!r} but the model has "
            f"model_type {model_type!r}"
        )
    journal = journal_of(model) if isinstance(model, fx.GraphModule) else journal_of_model(model)
    if journal is not None and journal.state != "none":
        raise CheckpointError(
            "the model is compressed already; load the checkpoint into a fresh instance of the base model"
        )


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return the tensors and the metadata of a safetensors file."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} not found; the checkpoint is incomplete, save the model again")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"cannot read {str(path)!r}, which is truncated or not a safetensors file ({err}); save the model again"
        ) from err


def _check_original(model: nn.Module, entry: dict[str, Any]) -> nn.Module:
    """Return the base model's module at a site, checked against the saved original shape."""
    path = entry["path"]
    try:
        module = model.get_submodule(path)
    except AttributeError as err:
        raise CheckpointError(f"site {path!r} of the checkpoint has no module in {type(model).__name__}") from err
    original = entry["original"]
    if "shapes" in original:
        shapes = {name: list(p.shape) for name, p in module.named_parameters(recurse=False)}
        if type(module).__name__ != original["class"] or shapes != original["shapes"]:
            raise CheckpointError(
                f"{path!r}: the checkpoint's original module is a {original['class']} with parameters "
                f"{original['shapes']}, but the model has a {type(module).__name__} with {shapes}; load into "
                "a model built from the original config"
            )
        return module
    in_features = getattr(module, "in_features", None)
    out_features = getattr(module, "out_features", None)
    if type(module).__name__ == "Conv1D":
        in_features, out_features = module.weight.shape
    if (in_features, out_features) != (original["in_features"], original["out_features"]):
        raise CheckpointError(
            f"site {path!r}: the checkpoint's original layer is {original['out_features']}x{original['in_features']} "
            f"(out x in) but the model's {type(module).__name__} is {out_features}x{in_features}; load into a "
            "model built from the original config. Hard pruning writes the new head and neuron counts "
            "into model.config in place, so build the fresh model from a copy of the config made "
            "before compression (copy.deepcopy(model.config)), or from the config.json that "
            "surgeon-fx compress writes"
        )
    return module


def _check_tensors(model: nn.Module, new_modules: dict[str, nn.Module], weights: dict[str, torch.Tensor]) -> None:
    """Check that ``weights`` has exactly the keys and shapes of the rebuilt model's state_dict."""
    expected = {}
    swapped = tuple(f"{p}." for p in new_modules)
    for name, tensor in model.state_dict().items():
        if not name.startswith(swapped):
            expected[name] = tuple(tensor.shape)
    for path, module in new_modules.items():
        for name, tensor in module.state_dict().items():
            expected[f"{path}.{name}"] = tuple(tensor.shape)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{WEIGHTS} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            "load into a model built from the same config"
        )
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(
                f"{WEIGHTS}: {name!r} has shape {list(weights[name].shape)} but the model expects {list(shape)}; "
                "load into a model built from the same config"
            )


# --- Loading --------------------------------------------------------------------------------


def _load_live(manifest: dict[str, Any], weights: dict[str, torch.Tensor], model: nn.Module) -> nn.Module:
    new_modules = {}
    for entry in manifest.get("sites", []):
        original = _check_original(model, entry)
        device = next(original.parameters(), torch.empty(0)).device
        new_modules[entry["path"]] = _build(entry["module"], device, entry["path"], original)
    _check_tensors(model, new_modules, weights)
    edits = [AttributeEdit(e["target"], e["name"], e["before"], e["after"]) for e in manifest.get("edits", [])]
    hard = manifest["state"] == "hard"
    for edit in edits:
        _check_edit(model, edit)

    journal = LiveJournal(plan=manifest.get("plan"), edits=edits, rewrites=manifest.get("rewrites", []),
                          notes=manifest.get("notes", []), hard=hard)
    for path, module in new_modules.items():
        journal.swaps.append(ModuleSwap(path, _swap(model, path, module)))
    try:
        if hard:
            for edit in edits:
                _set_attribute(model, edit, edit.after)
            for swap in journal.swaps:
                swap.previous = None
        with torch.no_grad():
            model.load_state_dict(weights, strict=True)
    except Exception as err:
        # NOTE: tensors outside the swapped sites that load_state_dict copied before
        # the failure are not rolled back; shapes were checked, so this is unexpected.
        for edit in edits if hard else []:
            _set_attribute(model, edit, edit.before)
        raise CheckpointError(f"loading the weights failed: {type(err).__name__}: {err}") from err
    if manifest["state"] != "none":
        model.__dict__[JOURNAL_ATTR] = journal
    return model


def _check_edit(model: nn.Module, edit: AttributeEdit) -> None:
    try:
        owner = edit_owner(model, edit.target)
    except AttributeError as err:
        raise CheckpointError(f"{MANIFEST} edits {edit.name!r} of {edit.target!r}, which the model lacks") from err
    if getattr(owner, edit.name, None) != edit.before:
        raise CheckpointError(
            f"{MANIFEST}: {edit.target}.{edit.name} was {edit.before!r} in the saved model's base but is "
            f"{getattr(owner, edit.name, None)!r} here; load into a model built from the same config"
        )




def _swap(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    previous = parent._modules[name]
    parent._modules[name] = module
    return previous


def _load_graph(manifest: dict[str, Any], weights: dict[str, torch.Tensor], gm: nn.Module) -> nn.Module:
    from .analysis import analyze
    from .passes.decompose_linear import decompose_linear
    from .passes.manager import PassManager, make_permanent
    from .plan import LRDAction

    if not isinstance(gm, fx.GraphModule):
        raise CheckpointError(
            f"the checkpoint contains a graph module but the model is a {type(gm).__name__}; load it "
            "into a fresh surgeon_fx.capture() of the model"
        )
    analysis = analyze(gm)
    actions = []
    for entry in manifest.get("sites", []):
        try:
            site = analysis.site(entry["path"])
        except Exception as err:  # noqa: BLE001 - AnalysisError names the known paths
            raise CheckpointError(f"site {entry['path']!r} of the checkpoint is not in the graph module: {err}") from err
        original = entry["original"]
        if (site.in_features, site.out_features) != (original["in_features"], original["out_features"]):
            raise CheckpointError(
                f"site {site.path!r}: the checkpoint's original layer is {original['out_features']}x"
                f"{original['in_features']} but the graph's is {site.out_features}x{site.in_features}"
            )
        spec = entry["module"]
        rank = None if spec.get("rank") == "full" else spec.get("rank")
        actions.append((LRDAction(site, rank, 0), spec))
    new_modules = {a.site.path: _build(spec, a.site.weight(gm).device, a.site.path) for a, spec in actions}
    _check_tensors(_graph_state_view(gm, new_modules), new_modules, weights)

    def empty_module(graph_module, site, rank):
        return new_modules[site.path]

    PassManager(gm).run([("decompose_linear", decompose_linear([a for a, _ in actions], factorize=empty_module))])
    with torch.no_grad():
        gm.load_state_dict(weights, strict=True)
    journal_of(gm).plan = manifest.get("plan")
    if manifest["state"] == "hard":
        make_permanent(gm)
    return gm


def _graph_state_view(gm: fx.GraphModule, new_modules: dict[str, nn.Module]) -> nn.Module:
    """Return a stand-in whose state_dict is ``gm``'s without the weights the sites replace."""
    replaced = {f"{p}.weight" for p in new_modules} | {f"{p}.bias" for p in new_modules}

    class _View(nn.Module):
        def state_dict(self, *args, **kwargs):
            return {k: v for k, v in gm.state_dict().items() if k not in replaced}

    return _View()


# --- Writing helpers -------------------------------------------------------------------------


def _dedup_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return tensors to write and ``alias -> name`` for tensors that are the same tensor.

    safetensors rejects tensors that share memory, so a tied weight is written once.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        tensor = tensor.detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        storage = tensor.untyped_storage().data_ptr()
        shared = tensor.numel() and storage in storages
        tensors[name] = tensor.clone().contiguous() if shared or not tensor.is_contiguous() else tensor
        seen[key] = name
        storages.add(storage)
    return tensors, aliases


def _versions() -> dict[str, str | None]:
    from . import __version__

    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    return {"surgeon_fx": __version__, "torch": torch.__version__, "transformers": transformers_version}
