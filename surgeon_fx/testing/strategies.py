"""Hypothesis strategies for models and plans, and the ``ci`` and ``thorough`` profiles.

This is the only module of :mod:`surgeon_fx.testing` that imports Hypothesis.

- :func:`transformer_configs` draws a :class:`~surgeon_fx.testing.families.ModelSpec`;
  :func:`~surgeon_fx.testing.families.build_model` turns it into a model and inputs.
- :func:`plans` draws plans that a model's analysis must accept.
- :func:`invalid_plans` draws plans that it must reject with ``PlanError``.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from ..analysis import ROLES, Analysis
from ..plan import Plan
from .families import (
    ACTIVATIONS,
    BIAS_OPTIONS,
    DECODER_ACTIVATIONS,
    FAMILIES,
    HEAD_DIM_FAMILIES,
    ModelSpec,
)
from .invariants import ATTENTION_AND_MLP_ROLES
from .predict import kept_heads, kept_units, predict_sites

__all__ = ["invalid_plans", "plans", "register_profiles", "transformer_configs"]

CI_EXAMPLES = 30
THOROUGH_EXAMPLES = 200


def register_profiles() -> None:
    """Register the ``ci`` profile (derandomized, few examples) and ``thorough`` (many).

    Property tests that build models scale their example counts from a profile's
    ``max_examples``, so ``ci`` bounds the whole suite's time.
    """
    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("ci", derandomize=True, database=None, max_examples=CI_EXAMPLES, print_blob=True, **common)
    settings.register_profile("thorough", max_examples=THOROUGH_EXAMPLES, **common)


# --- models ----------------------------------------------------------------------


@st.composite
def transformer_configs(draw, families: tuple[str, ...] = FAMILIES, max_layers: int = 2) -> ModelSpec:
    """Draw a small valid :class:`ModelSpec` of one of ``families``.

    Query heads are 1 to 4, key/value heads divide them (families with grouped-query
    attention only), head_dim is 4 or 8 and the hidden size is a multiple of the
    head count. Biases, activation, tied embeddings, an output head and eager or
    SDPA attention are drawn where the family has them.
    """
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; choose from {list(FAMILIES)}")
    family = draw(st.sampled_from(sorted(families)))
    heads = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([4, 8]))
    hidden = heads * head_dim * draw(st.sampled_from([1, 2])) if family in HEAD_DIM_FAMILIES else heads * head_dim
    hidden = max(hidden, 8)
    options: dict[str, Any] = {}
    if family in HEAD_DIM_FAMILIES and hidden != heads * head_dim:
        options["head_dim"] = head_dim
    if family in ("bert", "gpt2"):
        kv_heads = heads
    else:
        kv_heads = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    for name in BIAS_OPTIONS.get(family, ()):
        options[name] = draw(st.booleans())
    activation = draw(st.sampled_from(ACTIVATIONS.get(family, DECODER_ACTIVATIONS)))
    lm_head = family != "bert" and draw(st.booleans())
    return ModelSpec(
        family=family,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        intermediate_size=draw(st.integers(4, 48)),
        num_layers=draw(st.integers(1, max_layers)),
        activation=activation,
        tie_embeddings=lm_head and draw(st.booleans()),
        lm_head=lm_head,
        attn_implementation=draw(st.sampled_from(["eager", "sdpa"])),
        options=options,
        batch=draw(st.integers(1, 2)),
        seq_len=draw(st.integers(2, 6)),
    )


# --- valid plans -----------------------------------------------------------------


def _prunable(analysis: Analysis, unit: str) -> list:
    return [g for g in analysis.groups if g.unit == unit and not g.unsupported]


@st.composite
def _prune_rule(draw, analysis: Analysis) -> dict[str, Any] | None:
    units = [u for u in ("mlp_neurons", "heads", "hidden") if _prunable(analysis, u)]
    if not units:
        return None
    unit = draw(st.sampled_from(units))
    groups = _prunable(analysis, unit)
    rule: dict[str, Any] = {"unit": unit}
    if unit != "hidden" and len(groups) > 1 and draw(st.booleans()):
        # Select some layers; every site of a group shares its layer.
        chosen = draw(st.lists(st.sampled_from(groups), min_size=1, unique=True))
        rule["layers"] = sorted({g.layer for g in chosen})
        groups = [g for g in groups if g.layer in rule["layers"]]
    if unit == "heads":
        rule["gqa"] = draw(st.sampled_from(["groups", "queries"]))
    rule["ratio"] = draw(_ratio(groups, unit, rule.get("gqa", "groups")))
    # NOTE: the "activation" criterion needs calibration, which turns the default LRD
    # method into svd-llm, and svd-llm rejects pruned sites, so valid plans leave it out.
    rule["criterion"] = draw(st.sampled_from(["magnitude", "random"]))
    if rule["criterion"] == "random":
        rule["seed"] = draw(st.integers(0, 2**16))
    rule["round_to"] = draw(st.sampled_from([1, 1, 2, 4, 8]))
    return rule


def _ratio(groups: list, unit: str, gqa: str):
    """Return a strategy of ratios that leave at least one unit in every group."""
    if unit == "heads" and any(g.queries_per_kv > 1 for g in groups):
        counts = {g.num_kv_heads if gqa == "groups" else g.queries_per_kv for g in groups if g.queries_per_kv > 1}
        # A ratio every grouped-query group can meet: k / count for every count.
        common = math.lcm(*counts)
        steps = [k / common for k in range(common) if all(k * c % common == 0 for c in counts)]
        exact = [r for r in steps if all(_leaves_one(g, r, gqa) for g in groups)]
        return st.sampled_from(exact)
    smallest = min(g.size for g in groups)
    # round(ratio * n) <= n - 1 for every group: ratio < (n - 0.5) / n.
    top = (smallest - 0.5) / smallest
    grid = [r for r in (0.0, 0.1, 0.25, 0.3, 0.5, 0.75) if r < top]
    return st.one_of(st.sampled_from(grid), st.floats(0.0, top, exclude_max=True).map(lambda r: round(r, 3)).filter(lambda r: r < top))


def _leaves_one(group, ratio: float, gqa: str) -> bool:
    if group.queries_per_kv == 1:
        return kept_units(group.size, {"ratio": ratio}) >= 1
    heads, _ = kept_heads(group.size, group.num_kv_heads, {"ratio": ratio, "gqa": gqa})
    return heads >= 1


@st.composite
def _lrd_rule(draw, analysis: Analysis, shapes: dict, calibrated: bool) -> dict[str, Any]:
    sites = [s for s in analysis.sites if s.role in ATTENTION_AND_MLP_ROLES] or analysis.sites
    anchor = draw(st.sampled_from(sites))
    rule: dict[str, Any] = {}
    kind = draw(st.sampled_from(["roles", "roles_layers", "path", "glob", "all"]))
    if kind in ("roles", "roles_layers"):
        extra = draw(st.lists(st.sampled_from(sorted({s.role for s in sites})), max_size=3))
        rule["roles"] = sorted({anchor.role, *extra})
    if kind == "roles_layers" and anchor.layer is not None:
        rule["layers"] = [anchor.layer]
    if kind == "path":
        rule["paths"] = [anchor.path]
    if kind == "glob":
        rule["paths"] = [anchor.path.rsplit(".", 1)[0] + ".*"]

    matched = [s for s in analysis.sites if _matches(rule, s)]
    if not matched:
        rule = {"paths": [anchor.path]}
        matched = [anchor]

    limit = min(min(shapes[s.path].out_features, shapes[s.path].in_features) for s in matched)
    # The smallest fraction that gives rank >= 1 on every matched site.
    smallest_keep = max(_smallest_keep(shapes[s.path]) for s in matched)
    # A budget must pay for rank 1 on every site. Budgets appear only where calibrated
    # methods may, because the default method "auto" runs svd-llm once calibration is given.
    smallest_budget = _smallest_budget([shapes[s.path] for s in matched])
    budget = calibrated and smallest_budget <= 1
    choices = ["full", "int"]
    if smallest_keep <= 1:
        choices.append("keep")
    if budget:
        choices.append("budget")
    choice = draw(st.sampled_from(choices))


    if choice == "budget":
        fractions = sorted({f for f in (smallest_budget, 0.5, 0.8) if smallest_budget <= f <= 1})
        rule["budget"] = {draw(st.sampled_from(["params", "flops"])): draw(st.sampled_from(fractions))}
    elif choice == "full":
        rule["rank"] = "full"
    elif choice == "int":
        rule["rank"] = draw(st.integers(1, limit))
    else:
        fractions = sorted({f for f in (smallest_keep, 0.25, 0.5, 0.8, 1.0) if smallest_keep <= f <= 1})
        rule["rank"] = {"keep": draw(st.sampled_from(fractions))}
    if calibrated:
        rule["method"] = draw(st.sampled_from(["auto", "svd", "svd-llm", "asvd"]))
    return rule


def _smallest_keep(shape) -> float:
    """Return the smallest two-decimal fraction ``f`` with ``floor(f * m * n / (m + n)) >= 1``."""
    m, n = shape.out_features, shape.in_features
    return math.ceil(100 * (m + n) / (m * n)) / 100


def _smallest_budget(shapes: list) -> float:
    """Return the smallest two-decimal budget fraction that pays for rank 1 on every site."""
    dense = sum(shape.out_features * shape.in_features for shape in shapes)
    first_steps = 0
    for shape in shapes:
        m, n = shape.out_features, shape.in_features
        dense_rank = m * n // (m + n)
        if dense_rank == 0:
            return math.inf  # a site too small to factor at any rank
        # Rank 1 at a site whose dense rank is 1 leaves it dense, at cost m * n.
        first_steps += m * n if dense_rank == 1 else m + n
    return math.ceil(100 * first_steps / dense) / 100


def _matches(rule: dict, site) -> bool:
    from .predict import selects

    return selects(rule, site)


@st.composite
def plans(draw, analysis: Analysis, *, prune: bool = True, lrd: bool = True) -> dict[str, Any]:
    """Draw a plan dict that ``analysis`` accepts: prune rules, then low-rank rules.

    Ratios leave at least one unit in every selected group and meet grouped-query
    steps; ranks fit every selected site after pruning. Calibrated methods
    (``svd-llm``, ``asvd``) appear only in plans without prune rules, because they
    cannot decompose a pruned site. Compress a drawn plan soft or hard: both must work.
    """
    plan: dict[str, Any] = {}
    if prune:
        rules = [draw(_prune_rule(analysis)) for _ in range(draw(st.integers(0, 2)))]
        rules = [r for r in rules if r is not None]
        if rules:
            plan["prune"] = rules
    shapes = predict_sites(analysis, plan)
    if lrd:
        count = draw(st.integers(0 if plan.get("prune") else 1, 3))
        calibrated = not plan.get("prune")
        plan["lrd"] = [draw(_lrd_rule(analysis, shapes, calibrated)) for _ in range(count)]
        _fit_budgets(analysis, shapes, plan["lrd"])
    return plan


def _fit_budgets(analysis: Analysis, shapes: dict, rules: list[dict[str, Any]]) -> None:
    """Raise each budget to pay for rank 1 on the sites its rule keeps, after later rules took theirs."""
    for index, rule in enumerate(rules):
        if "budget" not in rule:
            continue
        owned = [s for s in analysis.sites if _matches(rule, s) and not any(_matches(r, s) for r in rules[index + 1:])]
        if not owned:
            continue
        smallest = _smallest_budget([shapes[s.path] for s in owned])
        kind, fraction = next(iter(rule["budget"].items()))
        if smallest > 1:
            del rule["budget"]
            rule["rank"] = "full"
        elif fraction < smallest:
            rule["budget"] = {kind: smallest}


# --- invalid plans ---------------------------------------------------------------

_BAD_VALUES = [
    {"lrd": [{"roles": ["mlp_down"], "rank": -3}]},
    {"lrd": [{"roles": ["mlp_down"], "rank": "half"}]},
    {"lrd": [{"roles": ["mlp_down"], "rank": {"keep": 0.0}}]},
    {"lrd": [{"roles": ["mlp_down"], "rank": {"keep": 1.5}}]},
    {"lrd": [{"roles": ["mlp_down"], "rank": 2, "budget": {"params": 0.5}}]},
    {"lrd": [{"roles": ["mlp_down"], "budget": {"params": 0.0}}]},
    {"lrd": [{"roles": ["mlp_down"], "rank": 2, "method": "qr"}]},
    {"lrd": [{"roles": ["attention"], "rank": 2}]},
    {"lrd": [{"roles": ["mlp_down"], "layers": ["x"], "rank": 2}]},
    {"lrd": [{"roles": ["mlp_down"], "rank": 2, "ranks": 3}]},
    {"lrd": {"roles": ["mlp_down"], "rank": 2}},
    {"quantize": []},
    {"prune": [{"unit": "channels", "ratio": 0.5}]},
    {"prune": [{"unit": "mlp_neurons", "ratio": 1.0}]},
    {"prune": [{"unit": "mlp_neurons", "ratio": -0.25}]},
    {"prune": [{"unit": "mlp_neurons", "ratio": "0.5"}]},
    {"prune": [{"unit": "mlp_neurons", "ratio": 0.5, "criterion": "taylor"}]},
    {"prune": [{"unit": "mlp_neurons", "ratio": 0.5, "round_to": 0}]},
    {"prune": [{"unit": "mlp_neurons", "ratio": 0.5, "seed": -1}]},
    {"prune": [{"unit": "heads", "ratio": 0.5, "gqa": "kv"}]},
    {"sequential": "yes"},
]


@st.composite
def _invalid_for_model(draw, analysis: Analysis) -> dict[str, Any]:
    """Draw a plan whose values parse but that this model must reject."""
    sites = analysis.sites
    site = draw(st.sampled_from(sites))
    limit = min(site.in_features, site.out_features)
    options: list[dict[str, Any]] = [
        {"lrd": [{"paths": [site.path], "rank": limit + draw(st.integers(1, 8))}]},
        {"lrd": [{"paths": [site.path], "rank": {"keep": 0.001}}]},
        {"lrd": [{"paths": [site.path + ".nothing"], "rank": 1}]},
        {"lrd": [{"layers": [max(analysis.layers or [0]) + draw(st.integers(1, 5))], "rank": 1}]},
        {"lrd": [{"paths": [site.path], "rank": 1, "method": draw(st.sampled_from(["svd-llm", "asvd"]))}]},
    ]
    missing = [r for r in ROLES if r != "other" and not analysis.sites_with_role(r)]
    if missing:
        options.append({"lrd": [{"roles": [draw(st.sampled_from(missing))], "rank": 1}]})
    for group in analysis.groups:
        if group.unsupported:
            continue
        too_much = (group.size - draw(st.sampled_from([0.0, 0.25, 0.4]))) / group.size
        rule: dict[str, Any] = {"unit": group.unit, "ratio": min(too_much, 0.9999)}
        if group.unit == "heads":
            rule["gqa"] = "queries" if group.queries_per_kv > 1 else "groups"
            if group.queries_per_kv > 1:
                rule["ratio"] = 0.9999
        options.append({"prune": [rule]})
        if group.unit == "mlp_neurons":
            # The activation criterion reads calibration statistics, which check_rejected does not pass.
            options.append({"prune": [{"unit": "mlp_neurons", "ratio": 0.25, "criterion": "activation"}]})
        coupled = sorted({s.role for s in group.sites})
        if group.unit != "hidden" and len(coupled) > 1:
            options.append({"prune": [{"unit": group.unit, "ratio": 0.0, "roles": coupled[:-1]}]})
        if group.unit == "heads" and group.queries_per_kv > 1 and group.num_kv_heads > 1:
            steps = group.num_kv_heads
            options.append({"prune": [{"unit": "heads", "ratio": 0.5 / steps, "gqa": "groups"}]})
        if group.unit == "hidden" and analysis.layers and any(s.layer is None for s in group.sites):
            options.append({"prune": [{"unit": "hidden", "ratio": 0.25, "layers": analysis.layers}]})
        q = group.attention.q if group.unit == "heads" else None
        if q is not None and group.size > 1 and group.queries_per_kv == 1 and q.out_features <= q.in_features:
            # A full query rank that no longer fits once half the heads are pruned.
            options.append({
                "prune": [{"unit": "heads", "ratio": 0.5}],
                "lrd": [{"paths": [q.path], "rank": q.out_features}],
            })
    return draw(st.sampled_from(options))


@st.composite
def invalid_plans(draw, analysis: Analysis) -> dict[str, Any]:
    """Draw a plan that ``analysis`` must reject: one invalid rule among valid ones.

    The invalid rule is either a malformed value or a well-formed rule that does not
    fit this model. Malformed values are unknown keys, roles, units, methods and
    criteria, and ranks, ratios, seeds or ``round_to`` out of range. Rules that do
    not fit are a rank above the site's size, a selector that matches nothing, a
    ratio that leaves no unit or misses grouped-query steps, a selector that splits
    a coupling group, and a calibrated method without calibration. Valid rules
    drawn with :func:`plans` come first, so a rejection must leave them undone too.
    """
    bad = draw(st.one_of(st.sampled_from(_BAD_VALUES), _invalid_for_model(analysis)))
    if not isinstance(bad.get("lrd", []), list) or set(bad) - {"lrd", "prune"}:
        return bad
    base = draw(plans(analysis, lrd=draw(st.booleans())))
    merged = {key: list(base.get(key, [])) + list(bad.get(key, [])) for key in ("prune", "lrd")}
    return {key: rules for key, rules in merged.items() if rules}
