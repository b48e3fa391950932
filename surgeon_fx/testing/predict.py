"""Parameter counts a plan should give, computed from the plan and the site shapes alone.

This is the oracle of the parameter-count invariant, so it shares no code with the
passes: it reads the plan's rules, the sites' roles and shapes and the attention
geometry of an :class:`~surgeon_fx.Analysis`, and applies the documented formulas.

- A prune rule with ratio ``p`` removes ``round(p * n)`` (halves up) of the ``n``
  units of each selected group, then rounds the remaining count up to a multiple
  of ``round_to``. Grouped-query heads ignore ``round_to``: ``gqa="groups"`` removes
  ``p * kv_heads`` whole key/value groups, ``gqa="queries"`` removes ``p * q`` of the
  ``q`` query heads of every group.
- A low-rank rule of rank ``r`` turns an ``m x n`` weight (after pruning) into
  ``r * (m + n)`` weights; ``{"keep": f}`` means ``r = floor(f * m * n / (m + n))``.

NOTE: for hidden-size pruning the oracle assumes two things. Every parameter with
an axis of exactly the hidden size, other than linear weights and biases, lies on
the residual stream (embeddings, norms, position tables). The only linear outputs
on the stream are the attention and MLP output projections. A model with another
layer writing into the stream breaks the second assumption.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from torch import nn

from ..analysis import Analysis, LinearSite

_STREAM_READERS = ("q", "k", "v", "qkv", "mlp_up", "mlp_gate", "mlp_gate_up")
_STREAM_WRITERS = ("attn_out", "mlp_down")


@dataclass
class SitePrediction:
    """Shape and rank of one linear site after the plan: ``rank`` is None when left dense."""

    out_features: int
    in_features: int
    has_bias: bool
    rank: int | None = None

    @property
    def num_params(self) -> int:
        weights = self.out_features * self.in_features
        if self.rank is not None:
            weights = self.rank * (self.out_features + self.in_features)
        return weights + (self.out_features if self.has_bias else 0)


def selects(rule: dict[str, Any], site: LinearSite) -> bool:
    """Return whether every selector of ``rule`` (a rule dict of a normalised plan) matches ``site``."""
    if "roles" in rule and site.role not in rule["roles"]:
        return False
    if "layers" in rule and site.layer not in rule["layers"]:
        return False
    if "paths" in rule and not any(fnmatch.fnmatchcase(site.path, p) for p in rule["paths"]):
        return False
    return True


def round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def kept_units(size: int, rule: dict[str, Any]) -> int:
    """Return how many of ``size`` plain units (neurons, channels, heads) a prune rule keeps."""
    keep = size - round_half_up(rule["ratio"] * size)
    round_to = rule.get("round_to", 1)
    if round_to > 1:
        keep = min(size, math.ceil(keep / round_to) * round_to)
    return keep


def kept_heads(heads: int, kv_heads: int, rule: dict[str, Any]) -> tuple[int, int]:
    """Return ``(query heads, key/value heads)`` kept by a head prune rule."""
    per_kv = heads // kv_heads
    if per_kv == 1:
        keep = kept_units(heads, rule)
        return keep, keep
    if rule.get("gqa", "groups") == "groups":
        keep_kv = kv_heads - round(rule["ratio"] * kv_heads)
        return keep_kv * per_kv, keep_kv
    keep_per = per_kv - round(rule["ratio"] * per_kv)
    return keep_per * kv_heads, kv_heads


def predict_sites(analysis: Analysis, plan: dict[str, Any]) -> dict[str, SitePrediction]:
    """Return the predicted shape and rank of every linear site, by path."""
    shapes = {s.path: SitePrediction(s.out_features, s.in_features, s.has_bias) for s in analysis.sites}
    for rule in plan.get("prune", []):
        _apply_prune_rule(analysis, rule, shapes)
    for site in analysis.sites:
        rule = _last_lrd_rule(plan, site)
        # NOTE: a budget rule's ranks depend on the singular values, so they stay unpredicted here.
        if rule is not None and "rank" in rule:
            shapes[site.path].rank = _rank(rule["rank"], shapes[site.path])
    return shapes


def hidden_kept(analysis: Analysis, plan: dict[str, Any]) -> int | None:
    """Return the hidden size a plan keeps, or ``None`` when it does not prune it."""
    rules = [r for r in plan.get("prune", []) if r["unit"] == "hidden"]
    if not rules:
        return None
    hidden = _hidden_size(analysis)
    return kept_units(hidden, rules[-1])


def predict_num_params(model: nn.Module, analysis: Analysis, plan: dict[str, Any]) -> int:
    """Return the parameter count of ``model`` (tied tensors once) after a hard ``plan``.

    ``plan`` is a normalised plan dict (``surgeon_fx.Plan.coerce(plan).to_dict()``).
    """
    sites = predict_sites(analysis, plan)
    site_tensors: dict[int, int] = {}
    added = 0
    for site in analysis.sites:
        weight, bias = site.tensors(analysis.gm)
        predicted = sites[site.path]
        if _shared(model, weight, site.path):
            # A tied weight (an output head reading the token embedding) stays for its
            # other reader; decomposing the site adds its factors and bias.
            added += predicted.num_params if predicted.rank is not None else 0
            continue
        site_tensors[id(weight)] = predicted.num_params - (predicted.out_features if predicted.has_bias else 0)
        if bias is not None:
            site_tensors[id(bias)] = predicted.out_features
    hidden = _hidden_size(analysis)
    keep_hidden = hidden_kept(analysis, plan)
    total = added
    for parameter in model.parameters():
        if id(parameter) in site_tensors:
            total += site_tensors[id(parameter)]
            continue
        count = parameter.numel()
        if keep_hidden is not None:
            for size in parameter.shape:
                if size == hidden:
                    count = count // hidden * keep_hidden
        total += count
    return total


def _shared(model: nn.Module, tensor, path: str) -> bool:
    """Return whether ``tensor`` is also a parameter outside the module at ``path``."""
    return any(p is tensor and not name.startswith(path + ".") for name, p in model.named_parameters(remove_duplicate=False))


def _hidden_size(analysis: Analysis) -> int | None:
    readers = [s for s in analysis.sites if s.role in _STREAM_READERS]
    return readers[0].in_features if readers else None


def _apply_prune_rule(analysis: Analysis, rule: dict[str, Any], shapes: dict[str, SitePrediction]) -> None:
    unit = rule["unit"]
    if unit == "hidden":
        hidden = _hidden_size(analysis)
        keep = kept_units(hidden, rule)
        for site in analysis.sites:
            shape = shapes[site.path]
            if site.role in _STREAM_WRITERS:
                shape.out_features = keep
            elif site.role in _STREAM_READERS or (site.role == "other" and site.in_features == hidden):
                shape.in_features = keep
        return
    if unit == "mlp_neurons":
        for down in analysis.sites_with_role("mlp_down"):
            sources = [s for s in analysis.sites if s.layer == down.layer and s.block == down.block
                       and s.role in ("mlp_up", "mlp_gate", "mlp_gate_up")]
            if not all(selects(rule, s) for s in sources + [down]):
                continue
            keep = kept_units(down.in_features, rule)
            for site in sources:
                shapes[site.path].out_features = 2 * keep if site.role == "mlp_gate_up" else keep
            shapes[down.path].in_features = keep
        return
    for op in analysis.attention:
        if not all(selects(rule, s) for s in op.sites):
            continue
        heads, kv_heads = kept_heads(op.num_heads, op.num_kv_heads, rule)
        if op.fused_qkv:
            shapes[op.q.path].out_features = (heads + 2 * kv_heads) * op.head_dim
        else:
            shapes[op.q.path].out_features = heads * op.head_dim
            shapes[op.k.path].out_features = kv_heads * op.head_dim
            shapes[op.v.path].out_features = kv_heads * op.head_dim
        shapes[op.out.path].in_features = heads * op.head_dim


def _last_lrd_rule(plan: dict[str, Any], site: LinearSite) -> dict[str, Any] | None:
    chosen = None
    for rule in plan.get("lrd", []):
        if selects(rule, site):
            chosen = rule
    return chosen


def _rank(rank: Any, shape: SitePrediction) -> int | None:
    if rank == "full":
        return None
    if isinstance(rank, dict):
        m, n = shape.out_features, shape.in_features
        return min(math.floor(Fraction(str(rank["keep"])) * m * n / (m + n)), m, n)
    return rank
