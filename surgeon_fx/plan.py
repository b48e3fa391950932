"""Plans: a declarative, validated description of what to compress and how.

A plan is built in Python, from a dict, or from a TOML or JSON file::

    {"lrd": [{"roles": ["attn_out", "mlp_down"], "layers": [0, 1, "2-4"], "rank": 64}]}

Each rule selects sites by ``roles``, ``layers`` (indices, Python ranges or inclusive
``"a-b"`` strings) and ``paths`` (glob patterns on module paths). All given
selectors must match. A site matched by several rules takes the last one.
"""

from __future__ import annotations

import fnmatch
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .analysis import ROLES, Analysis, LinearSite
from .errors import PlanError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

LRD_METHODS = ("svd",)
_SELECTOR_KEYS = ("roles", "layers", "paths")
_LRD_KEYS = set(_SELECTOR_KEYS) | {"rank", "method"}


@dataclass(frozen=True)
class Selector:
    """Which sites a rule applies to; ``None`` means any."""

    roles: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    paths: tuple[str, ...] | None = None

    def matches(self, site: LinearSite) -> bool:
        if self.roles is not None and site.role not in self.roles:
            return False
        if self.layers is not None and site.layer not in self.layers:
            return False
        if self.paths is not None and not any(fnmatch.fnmatchcase(site.path, p) for p in self.paths):
            return False
        return True

    def to_dict(self) -> dict[str, list]:
        out: dict[str, list] = {}
        for key in _SELECTOR_KEYS:
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value)
        return out


@dataclass(frozen=True)
class Keep:
    """A rank given as the fraction of a layer's weights to keep.

    For an ``m x n`` weight, ``rank = floor(fraction * m * n / (m + n))``.
    """

    fraction: float

    def rank_for(self, out_features: int, in_features: int) -> int:
        return math.floor(self.fraction * out_features * in_features / (out_features + in_features))


@dataclass(frozen=True)
class LRDRule:
    """Decompose the selected sites to ``rank`` (an int, ``"full"`` or :class:`Keep`)."""

    selector: Selector
    rank: int | str | Keep
    method: str = "svd"

    def to_dict(self) -> dict[str, Any]:
        rank = {"keep": self.rank.fraction} if isinstance(self.rank, Keep) else self.rank
        return {**self.selector.to_dict(), "rank": rank, "method": self.method}


@dataclass(frozen=True)
class LRDAction:
    """One site to decompose, with the rank the plan resolved for it."""

    site: LinearSite
    rank: int | None  # None: full rank, the site is left as it is
    rule_index: int


@dataclass
class Plan:
    """An ordered list of compression rules."""

    lrd: list[LRDRule] = field(default_factory=list)
    prune: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def coerce(cls, plan: Plan | dict | str | Path) -> Plan:
        """Return ``plan`` as a :class:`Plan`, reading a dict or a TOML/JSON file."""
        if isinstance(plan, Plan):
            return plan
        if isinstance(plan, dict):
            return cls.from_dict(plan)
        if isinstance(plan, (str, Path)):
            return cls.from_file(plan)
        raise PlanError(f"a plan must be a Plan, a dict or a file path, got {type(plan).__name__}")

    @classmethod
    def from_file(cls, path: str | Path) -> Plan:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise PlanError(f"cannot read plan file {str(path)!r}: {err.strerror}") from err
        try:
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as err:
            raise PlanError(f"plan file {str(path)!r} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {err}") from err
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict):
            raise PlanError(f"a plan must be a mapping with keys 'lrd' and 'prune', got {type(data).__name__}")
        unknown = set(data) - {"lrd", "prune"}
        if unknown:
            raise PlanError(f"unknown plan keys {sorted(unknown)}; a plan has the keys 'lrd' and 'prune'")
        lrd = [_parse_lrd_rule(rule, i) for i, rule in enumerate(_rule_list(data, "lrd"))]
        prune = _rule_list(data, "prune")
        if prune:
            raise PlanError(
                "plan key 'prune' is not supported by this version of surgeon_fx; "
                "remove the prune rules or use low-rank decomposition ('lrd')"
            )
        return cls(lrd=lrd, prune=prune)

    def to_dict(self) -> dict[str, Any]:
        return {"lrd": [rule.to_dict() for rule in self.lrd], "prune": list(self.prune)}

    def resolve_lrd(self, analysis: Analysis) -> list[LRDAction]:
        """Return one action per selected site, validated against ``analysis``.

        Raises:
            PlanError: a rule matches no site, a rank is out of range for a site, or
                a selected site's weight is not finite.
        """
        chosen: dict[LinearSite, LRDAction] = {}
        for index, rule in enumerate(self.lrd):
            matched = [s for s in analysis.sites if rule.selector.matches(s)]
            if not matched:
                raise PlanError(
                    f"lrd rule {index} ({rule.selector.to_dict()}) matches no linear site; "
                    f"the model has roles {sorted({s.role for s in analysis.sites})} "
                    f"and layers {analysis.layers}"
                )
            for site in matched:
                chosen[site] = LRDAction(site, _resolve_rank(rule, index, site), index)
        actions = [chosen[s] for s in analysis.sites if s in chosen]
        for action in actions:
            if action.rank is not None:
                _check_finite(analysis, action)
        return actions


def _rule_list(data: dict, key: str) -> list:
    rules = data.get(key, [])
    if not isinstance(rules, list):
        raise PlanError(f"plan key {key!r} must be a list of rules, got {type(rules).__name__}")
    return rules


def _parse_lrd_rule(rule: Any, index: int) -> LRDRule:
    where = f"lrd rule {index}"
    if not isinstance(rule, dict):
        raise PlanError(f"{where} must be a mapping, got {rule!r}")
    unknown = set(rule) - _LRD_KEYS
    if unknown:
        raise PlanError(f"{where} has unknown keys {sorted(unknown)}; allowed keys are {sorted(_LRD_KEYS)}")
    if "rank" not in rule:
        raise PlanError(f"{where} has no 'rank'; give an int, \"full\" or {{\"keep\": fraction}}")
    method = rule.get("method", "svd")
    if method not in LRD_METHODS:
        raise PlanError(f"{where} has unknown method {method!r}; choose one of {list(LRD_METHODS)}")
    return LRDRule(selector=parse_selector(rule, where), rank=_parse_rank(rule["rank"], where), method=method)


def parse_selector(rule: dict, where: str) -> Selector:
    """Read the ``roles``, ``layers`` and ``paths`` selectors of a rule."""
    roles = rule.get("roles")
    if roles is not None:
        roles = _as_tuple(roles, where, "roles", str)
        unknown = [r for r in roles if r not in ROLES]
        if unknown:
            raise PlanError(f"{where} names unknown roles {unknown}; known roles are {list(ROLES)}")
    layers = rule.get("layers")
    if layers is not None:
        layers = tuple(_parse_layers(layers, where))
    paths = rule.get("paths")
    if paths is not None:
        paths = _as_tuple(paths, where, "paths", str)
    return Selector(roles=roles, layers=layers, paths=paths)


def _as_tuple(value: Any, where: str, key: str, kind: type) -> tuple:
    items = (value,) if isinstance(value, kind) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, kind) for v in items):
        raise PlanError(f"{where}: {key!r} must be a list of {kind.__name__}, got {value!r}")
    return tuple(items)


def _parse_layers(value: Any, where: str) -> list[int]:
    items = value if isinstance(value, (list, tuple)) else [value]
    layers: list[int] = []
    for item in items:
        if isinstance(item, range):
            layers.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            layers.append(item)
        elif isinstance(item, str) and _is_range_text(item):
            first, last = (int(p) for p in item.split("-"))
            layers.extend(range(first, last + 1))
        else:
            raise PlanError(
                f"{where}: invalid layer {item!r}; give non-negative indices, Python ranges "
                "or inclusive ranges such as \"0-5\""
            )
    return layers


def _is_range_text(text: str) -> bool:
    parts = text.split("-")
    return len(parts) == 2 and all(p.strip().isdigit() for p in parts) and int(parts[0]) <= int(parts[1])


def _parse_rank(rank: Any, where: str) -> int | str | Keep:
    if rank == "full":
        return "full"
    if isinstance(rank, int) and not isinstance(rank, bool):
        if rank <= 0:
            raise PlanError(f"{where}: rank must be positive, got {rank}")
        return rank
    if isinstance(rank, dict) and set(rank) == {"keep"}:
        fraction = rank["keep"]
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
            raise PlanError(f"{where}: rank {{'keep': {fraction!r}}} must keep a fraction in (0, 1]")
        return Keep(float(fraction))
    if isinstance(rank, Keep):
        return _parse_rank({"keep": rank.fraction}, where)
    raise PlanError(f"{where}: invalid rank {rank!r}; give a positive int, \"full\" or {{\"keep\": fraction}}")


def _resolve_rank(rule: LRDRule, index: int, site: LinearSite) -> int | None:
    if rule.rank == "full":
        return None
    limit = min(site.in_features, site.out_features)
    if isinstance(rule.rank, Keep):
        rank = rule.rank.rank_for(site.out_features, site.in_features)
        if rank < 1:
            raise PlanError(
                f"lrd rule {index}: keeping {rule.rank.fraction} of {site.path} "
                f"({site.out_features}x{site.in_features}) gives rank {rank}; keep a larger fraction"
            )
        return min(rank, limit)
    if rule.rank > limit:
        raise PlanError(
            f"lrd rule {index}: rank {rule.rank} exceeds min(out_features, in_features) = {limit} "
            f"at {site.path} ({site.out_features}x{site.in_features}); use a rank <= {limit} or \"full\""
        )
    return rule.rank


def _check_finite(analysis: Analysis, action: LRDAction) -> None:
    weight = action.site.weight(analysis.gm)
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise PlanError(
            f"lrd rule {action.rule_index}: the weight of {action.site.path} has {bad} non-finite "
            "values (NaN or inf); fix the weights or exclude the site with 'paths'"
        )
