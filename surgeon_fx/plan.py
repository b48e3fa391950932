"""Plans: a declarative, validated description of what to compress and how.

A plan is built in Python, from a dict, or from a TOML or JSON file::

    {"lrd": [{"roles": ["attn_out", "mlp_down"], "layers": [0, 1, "2-4"], "rank": 64}]}

Each rule selects sites by ``roles``, ``layers`` (indices, Python ranges or inclusive
``"a-b"`` strings), ``paths`` (glob patterns on module paths) and ``towers`` (tower
names such as ``"vision"`` and ``"text"``, or stack prefixes, as
:attr:`Analysis.towers` lists them). All given selectors must match. A site matched by several rules takes the last one.

A prune rule removes a ``ratio`` of the units of every coupling group it selects
(``"mlp_neurons"``, ``"heads"`` or ``"hidden"``); its selectors must match every
linear site of a group or none of them. Pruning runs before low-rank decomposition.
"""

from __future__ import annotations

import fnmatch
import json
import math
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from .analysis import ROLES, Analysis, LinearSite
from .errors import PlanError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# "auto" is "svd-llm" when calibration statistics are given and "svd" otherwise.
LRD_METHODS = ("auto", "svd", "svd-llm", "asvd")
CALIBRATED_METHODS = ("svd-llm", "asvd")
BUDGET_KINDS = ("params", "flops")
_SELECTOR_KEYS = ("roles", "layers", "paths", "towers")
_LRD_KEYS = set(_SELECTOR_KEYS) | {"rank", "method", "budget"}
PRUNE_UNITS = ("mlp_neurons", "heads", "hidden")
PRUNE_CRITERIA = ("magnitude", "random", "activation")
GQA_MODES = ("groups", "queries")
_PRUNE_KEYS = set(_SELECTOR_KEYS) | {"unit", "ratio", "criterion", "seed", "round_to", "gqa"}


@dataclass(frozen=True)
class Selector:
    """The sites a rule applies to. A selector left at ``None`` matches any site."""

    roles: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    paths: tuple[str, ...] | None = None
    towers: tuple[str, ...] | None = None  # tower names or stack prefixes

    def matches(self, site: LinearSite) -> bool:
        if self.roles is not None and site.role not in self.roles:
            return False
        if self.towers is not None and site.tower not in self.towers and site.block not in self.towers:
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
        # Exact arithmetic on the decimal the user wrote: in floats 0.3 * 24 * 120 / 144
        # is 5.999..., which would floor to 5 instead of 6.
        keep = Fraction(str(self.fraction))
        return math.floor(keep * out_features * in_features / (out_features + in_features))


@dataclass(frozen=True)
class LRDRule:
    """Decompose the selected sites to ``rank`` (an int, ``"full"`` or :class:`Keep`).

    With a ``budget`` such as ``{"params": 0.5}`` instead of a rank, each selected
    site gets its own rank so that the selection keeps that fraction of its weights
    while the summed truncation error is smallest (see :mod:`surgeon_fx.budget`).
    """

    selector: Selector
    rank: int | str | Keep | None = None
    method: str = "auto"
    budget: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.selector.to_dict(), "method": self.method}
        if self.budget is not None:
            out["budget"] = dict(self.budget)
        else:
            out["rank"] = {"keep": self.rank.fraction} if isinstance(self.rank, Keep) else self.rank
        return out


@dataclass(frozen=True)
class PruneRule:
    """Remove ``ratio`` of the units of each selected coupling group.

    ``criterion`` ranks units by the L2 norm of every weight coupled to them
    (``"magnitude"``) or by seeded random scores (``"random"``). ``round_to`` rounds
    the remaining count of neurons, channels or heads up to a multiple of that
    number. Grouped-query heads ignore ``round_to`` because they go in whole steps:
    ``gqa="groups"`` removes whole key/value groups, and ``gqa="queries"`` removes
    the same number of query heads from every group.
    """

    selector: Selector
    unit: str
    ratio: float
    criterion: str = "magnitude"
    seed: int = 0
    round_to: int = 1
    gqa: str = "groups"

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.selector.to_dict(), "unit": self.unit, "ratio": self.ratio, "criterion": self.criterion,
            "seed": self.seed, "round_to": self.round_to, "gqa": self.gqa,
        }


@dataclass(frozen=True)
class LRDAction:
    """One site to decompose, with the rank the plan resolved for it."""

    site: LinearSite
    rank: int | None  # None: full rank, the site is left as it is
    rule_index: int
    method: str = "svd"


@dataclass
class Plan:
    """An ordered list of compression rules."""

    lrd: list[LRDRule] = field(default_factory=list)
    prune: list[PruneRule] = field(default_factory=list)
    # Compress block by block, calibrating each block on the outputs of the
    # already-compressed blocks before it.
    sequential: bool = False

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
            text = path.read_text(encoding="utf-8")  # TOML and JSON files are UTF-8
        except OSError as err:
            raise PlanError(f"cannot read plan file {str(path)!r}: {err.strerror}") from err
        except UnicodeDecodeError as err:
            raise PlanError(f"plan file {str(path)!r} is not UTF-8 text ({err}); save it as UTF-8") from err
        try:
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as err:
            raise PlanError(f"plan file {str(path)!r} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {err}") from err
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict):
            raise PlanError(f"a plan must be a mapping with keys 'lrd' and 'prune', got {type(data).__name__}")
        unknown = set(data) - {"lrd", "prune", "sequential"}
        if unknown:
            raise PlanError(
                f"unknown plan keys {sorted(unknown)}; a plan has the keys 'lrd', 'prune' and 'sequential'"
            )
        sequential = data.get("sequential", False)
        if not isinstance(sequential, bool):
            raise PlanError(f"plan key 'sequential' must be true or false, got {sequential!r}")
        lrd = [_parse_lrd_rule(rule, i) for i, rule in enumerate(_rule_list(data, "lrd"))]
        prune = [_parse_prune_rule(rule, i) for i, rule in enumerate(_rule_list(data, "prune"))]
        if sequential and prune:
            raise PlanError(
                "plan key 'sequential' applies to plans with lrd rules only, and this one has "
                f"{len(prune)} prune rules; set 'sequential' to false, or prune and decompose in two steps"
            )
        return cls(lrd=lrd, prune=prune, sequential=sequential)

    def to_dict(self) -> dict[str, Any]:
        out = {"lrd": [rule.to_dict() for rule in self.lrd], "prune": [rule.to_dict() for rule in self.prune]}
        if self.sequential:
            out["sequential"] = True
        return out

    def calibrated_sites(self, analysis: Analysis) -> list[LinearSite]:
        """Return the sites that any rule selects: those whose inputs calibration records."""
        rules = [*self.lrd, *self.prune]
        return [s for s in analysis.sites if any(r.selector.matches(s) for r in rules)]

    def resolve_prune(self, analysis: Analysis, stats: dict | None = None, source=None):
        """Return the channels to keep in every selected coupling group, validated.

        Returns a :class:`~surgeon_fx.passes.prune_select.PruneSelection`. Weights are
        read from ``source`` (default: ``analysis.gm``).

        Raises:
            PlanError: a rule matches no group, selects only some sites of a group, or
                asks for a ratio the group cannot meet.
        """
        from .passes.prune_select import select_channels

        return select_channels(self.prune, analysis, stats, source)

    def resolve_lrd(
        self, analysis: Analysis, *, require_match: bool = True, stats: dict | None = None
    ) -> list[LRDAction]:
        """Return one action per selected site, validated against ``analysis``.

        With ``require_match=False`` a rule that matches no site is skipped, which the
        ``torch.compile`` backend needs because each Dynamo graph holds part of a model.

        Raises:
            PlanError: a rule matches no site (with ``require_match``), a rank is out
                of range for a site, a method needs calibration ``stats`` that are
                missing, or a selected site's weight is not finite.
        """
        chosen: dict[LinearSite, LRDAction] = {}
        for index, rule in enumerate(self.lrd):
            matched = [s for s in analysis.sites if rule.selector.matches(s)]
            if not matched and require_match:
                raise PlanError(
                    f"lrd rule {index} ({rule.selector.to_dict()}) matches no linear site; "
                    f"the model has roles {sorted({s.role for s in analysis.sites})}, "
                    f"layers {analysis.layers} and towers {sorted(analysis.towers)}"
                )
            if rule.method in CALIBRATED_METHODS or (rule.method == "auto" and stats is not None):
                _check_stats(rule, index, matched, stats)
            method = concrete_method(rule.method, stats)
            if rule.budget is not None and matched:
                # The budget covers only the sites this rule keeps: a later rule takes the others.
                owned = [s for s in matched if not any(r.selector.matches(s) for r in self.lrd[index + 1:])]
                for site in owned:
                    _check_finite(analysis, LRDAction(site, None, index))
                for site, rank in (_budget_ranks(analysis, rule, index, owned, stats) if owned else {}).items():
                    chosen[site] = LRDAction(site, rank, index, method)
                continue
            for site in matched:
                chosen[site] = LRDAction(site, _resolve_rank(rule, index, site), index, method)
        actions = [chosen[s] for s in analysis.sites if s in chosen]
        for action in actions:
            if action.rank is not None:
                _check_finite(analysis, action)
        return actions


def _check_stats(rule: LRDRule, index: int, sites: list[LinearSite], stats: dict | None) -> None:
    if stats is None:
        raise PlanError(
            f"lrd rule {index} uses method {rule.method!r}, which needs calibration; pass "
            "calibration=batches of model inputs to compress(), compress_model() or "
            "CompressionSchemesManager(), or use method 'svd'"
        )
    missing = [s.path for s in sites if s.path not in stats]
    if missing:
        raise PlanError(f"lrd rule {index}: the calibration statistics lack sites {missing[:3]}; calibrate again")
    check_reached(f"lrd rule {index}", sites, stats)


def check_reached(where: str, sites: list[LinearSite], stats: dict) -> None:
    """Raise if the calibration batches never ran some of ``sites`` (no token was recorded).

    Raises:
        PlanError: with the unreached sites and their towers.
    """
    unreached = [s for s in sites if s.path in stats and stats[s.path].tokens == 0]
    if unreached:
        towers = sorted({str(s.tower) for s in unreached})
        raise PlanError(
            f"{where}: the calibration batches never ran {[s.path for s in unreached[:3]]} (towers {towers}); "
            "give batches that reach them (images for a vision tower), or select only the sites they reach"
        )


def concrete_method(method: str, stats: dict | None) -> str:
    """Return the method a rule runs: ``"auto"`` becomes ``"svd-llm"`` with statistics."""
    if method != "auto":
        return method
    return "svd-llm" if stats is not None else "svd"


def _budget_ranks(analysis: Analysis, rule: LRDRule, index: int, sites: list[LinearSite], stats) -> dict:
    from .budget import allocate_ranks
    from .lrd_methods import input_transform, spectrum

    spectra = []
    for site in sites:
        method = concrete_method(rule.method, stats)
        transform = input_transform(method, stats.get(site.path) if stats else None, site.in_features)
        spectra.append(spectrum(site.weight(analysis.gm), transform))
    fraction = next(iter(rule.budget.values()))
    return allocate_ranks(sites, spectra, fraction, f"lrd rule {index}")


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
    if ("rank" in rule) == ("budget" in rule):
        raise PlanError(
            f"{where} needs exactly one of 'rank' (an int, \"full\" or {{\"keep\": fraction}}) "
            "and 'budget' (such as {\"params\": 0.5})"
        )
    method = rule.get("method", "auto")
    if method not in LRD_METHODS:
        raise PlanError(f"{where} has unknown method {method!r}; choose one of {list(LRD_METHODS)}")
    selector = parse_selector(rule, where)
    if "budget" in rule:
        return LRDRule(selector=selector, method=method, budget=_parse_budget(rule["budget"], where))
    return LRDRule(selector=selector, rank=_parse_rank(rule["rank"], where), method=method)


def _parse_budget(budget: Any, where: str) -> dict[str, float]:
    if not isinstance(budget, dict) or len(budget) != 1 or next(iter(budget)) not in BUDGET_KINDS:
        raise PlanError(f"{where}: invalid budget {budget!r}; give {{\"params\": fraction}} or {{\"flops\": fraction}}")
    kind, fraction = next(iter(budget.items()))
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise PlanError(f"{where}: budget {kind} fraction must be in (0, 1], got {fraction!r}")
    return {kind: float(fraction)}


def _parse_prune_rule(rule: Any, index: int) -> PruneRule:
    where = f"prune rule {index}"
    if not isinstance(rule, dict):
        raise PlanError(f"{where} must be a mapping, got {rule!r}")
    unknown = set(rule) - _PRUNE_KEYS
    if unknown:
        raise PlanError(f"{where} has unknown keys {sorted(unknown)}; allowed keys are {sorted(_PRUNE_KEYS)}")
    unit = rule.get("unit")
    if unit not in PRUNE_UNITS:
        raise PlanError(f"{where} has unit {unit!r}; choose one of {list(PRUNE_UNITS)}")
    ratio = rule.get("ratio")
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio < 1:
        raise PlanError(f"{where}: ratio must be a number in [0, 1), got {ratio!r}")
    criterion = rule.get("criterion", "magnitude")
    if criterion not in PRUNE_CRITERIA:
        raise PlanError(f"{where} has unknown criterion {criterion!r}; choose one of {list(PRUNE_CRITERIA)}")
    seed = rule.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise PlanError(f"{where}: seed must be a non-negative int, got {seed!r}")
    round_to = rule.get("round_to", 1)
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise PlanError(f"{where}: round_to must be a positive int, got {round_to!r}")
    gqa = rule.get("gqa", "groups")
    if gqa not in GQA_MODES:
        raise PlanError(
            f"{where} has gqa {gqa!r}; choose \"groups\" (remove whole key/value groups) "
            "or \"queries\" (remove query heads from every group)"
        )
    return PruneRule(parse_selector(rule, where), unit, float(ratio), criterion, seed, round_to, gqa)


def parse_selector(rule: dict, where: str) -> Selector:
    """Read the ``roles``, ``layers``, ``paths`` and ``towers`` selectors of a rule."""
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
    towers = rule.get("towers")
    if towers is not None:
        towers = _as_tuple(towers, where, "towers", str)
    return Selector(roles=roles, layers=layers, paths=paths, towers=towers)


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
    finite = torch.isfinite(weight)
    if not finite.all():
        bad = (~finite).nonzero()
        first = [int(i) for i in bad[0]]  # index into the (out_features, in_features) weight
        raise PlanError(
            f"lrd rule {action.rule_index}: the weight of {action.site.path} has {len(bad)} non-finite "
            f"values, the first {weight[tuple(first)].item()} at index {first}; fix the weights "
            "or exclude the site with 'paths'"
        )
