"""Choose the channels that prune rules keep, group by group, before anything changes.

:func:`select_channels` matches each prune rule to coupling groups, checks that the
rule can be met, ranks the units of each group and returns a :class:`PruneSelection`:
the kept units per group, and from them the kept indices of every tensor axis.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .._fx_utils import fetch_attr
from ..analysis import Analysis, LinearSite
from ..analysis.coupling import CouplingGroup, Slot
from ..errors import PlanError, SurgeonWarning

_TOLERANCE = 1e-6


@dataclass(frozen=True, eq=False)
class PruneAction:
    """Keep ``kept`` (ascending unit indices) of ``group``, as rule ``rule_index`` chose."""

    group: CouplingGroup
    kept: list[int]
    rule_index: int

    @property
    def removed(self) -> int:
        return self.group.size - len(self.kept)


@dataclass
class PruneSelection:
    """Kept indices of every pruned tensor axis.

    ``site_indices`` maps ``(site path, "out" | "in")`` and ``param_indices`` maps
    ``(parameter path, dim)`` to the ascending indices that stay.
    """

    actions: list[PruneAction] = field(default_factory=list)
    site_indices: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    param_indices: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    sites: dict[str, LinearSite] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.actions)

    def site_shape(self, site: LinearSite) -> tuple[int, int]:
        """Return ``(out_features, in_features)`` of ``site`` after pruning."""
        out = self.site_indices.get((site.path, "out"))
        into = self.site_indices.get((site.path, "in"))
        return (site.out_features if out is None else len(out), site.in_features if into is None else len(into))

    def num_params_after(self, gm: fx.GraphModule) -> int:
        """Return the parameter count of ``gm`` once this selection is hard-pruned."""
        new_sizes: dict[int, int] = {}
        for site in self.sites.values():
            out, into = self.site_shape(site)
            weight, bias = site.tensors(gm)
            new_sizes[id(weight)] = out * into
            if bias is not None:
                new_sizes[id(bias)] = out
        for (path, dim), kept in self.param_indices.items():
            tensor = fetch_attr(gm, path)
            current = new_sizes.get(id(tensor), tensor.numel())
            new_sizes[id(tensor)] = current // tensor.shape[dim] * len(kept)
        return sum(new_sizes.get(id(p), p.numel()) for p in gm.parameters())

    def kept_hidden(self) -> list[int] | None:
        """Kept hidden channels, or ``None`` when the hidden size is not pruned."""
        for action in self.actions:
            if action.group.unit == "hidden":
                return action.kept
        return None


def select_channels(
    rules: list, analysis: Analysis, stats: dict | None = None, source: nn.Module | None = None
) -> PruneSelection:
    """Resolve ``rules`` (a list of :class:`~surgeon_fx.plan.PruneRule`) against ``analysis``.

    ``stats`` (calibration statistics by site path) feed the ``"activation"`` criterion.
    Weights are read from ``source`` (default: the analysed graph module), which must
    hold every tensor of the groups at its dotted path; the live model does.

    Raises:
        PlanError: a rule matches no group, covers only part of a group, or requests
            a ratio that leaves nothing or that grouped-query attention cannot meet.
    """
    chosen: dict[CouplingGroup, tuple[int, object]] = {}
    for index, rule in enumerate(rules):
        groups = [g for g in analysis.groups if g.unit == rule.unit and _selects(rule, index, g)]
        if not groups:
            raise PlanError(
                f"prune rule {index} ({rule.selector.to_dict()}) matches no {rule.unit} group; the "
                f"model has {sum(g.unit == rule.unit for g in analysis.groups)} such groups. Print "
                "analysis.groups to see them"
            )
        for group in groups:
            chosen[group] = (index, rule)
    selection = PruneSelection(sites={s.path: s for s in analysis.sites})
    tensors = analysis.gm if source is None else source
    for group in analysis.groups:
        if group not in chosen:
            continue
        index, rule = chosen[group]
        kept = _kept_units(group, rule, index, tensors, stats)
        if len(kept) < group.size:
            selection.actions.append(PruneAction(group, kept, index))
    _warn_idle_rules(rules, chosen, selection)
    _index_axes(selection, tensors)
    selection.sites = {p: s for p, s in selection.sites.items() if (p, "out") in selection.site_indices
                       or (p, "in") in selection.site_indices}
    return selection


def _warn_idle_rules(rules: list, chosen: dict, selection: PruneSelection) -> None:
    """Warn about each rule with a ratio above 0 that removes no unit, after rounding."""
    busy = {action.rule_index for action in selection.actions}
    for index, rule in enumerate(rules):
        groups = [g for g, (i, _) in chosen.items() if i == index]
        if rule.ratio > 0 and groups and index not in busy:
            smallest = min(g.size for g in groups)
            # Removing round_to units from the smallest group needs ratio * n + 0.5 >= round_to.
            # The suggestion is rounded up, so that it acts as written.
            needed = math.ceil((rule.round_to - 0.5) / smallest * 10_000) / 10_000
            fix = f"raise the ratio to at least {needed:g}" if needed < 1 else "lower round_to"
            warnings.warn(
                f"prune rule {index} (ratio {rule.ratio}, round_to {rule.round_to}) removes nothing from its "
                f"{len(groups)} groups of {smallest} or more {_unit_word(groups[0])}, because whole units are "
                f"kept and counts are rounded; {fix}",
                SurgeonWarning,
                stacklevel=4,
            )


def _selects(rule, index: int, group: CouplingGroup) -> bool:
    if group.unit == "hidden" and group.tower is not None and rule.selector.towers is not None:
        # A tower's residual stream also runs through layers outside its stack (the
        # patch merger that writes image features into the text, the output head).
        if group.tower not in rule.selector.towers and group.block not in rule.selector.towers:
            return False
        rule = dataclasses.replace(rule, selector=dataclasses.replace(rule.selector, towers=None))
    matched = [s for s in group.sites if rule.selector.matches(s)]
    if not matched:
        return False
    if len(matched) < len(group.sites):
        excluded = [s.path for s in group.sites if s not in matched]
        raise PlanError(
            f"prune rule {index} ({rule.selector.to_dict()}) selects {[s.path for s in matched]} "
            f"but excludes the coupled sites {excluded} of group '{group.name}'; their channels "
            "must be removed together, so select all of them or none"
        )
    if group.unsupported:
        raise PlanError(f"prune rule {index}: group '{group.name}' cannot be pruned: {group.unsupported}")
    return True


def _kept_units(group: CouplingGroup, rule, index: int, gm: fx.GraphModule, stats) -> list[int]:
    scores = _unit_scores(group, rule, gm, _input_norms(group, rule, index, stats))
    per_kv = group.queries_per_kv
    if group.unit == "heads" and per_kv > 1:
        return _kept_gqa_heads(group, rule, index, scores)
    keep = _keep_count(group.size, rule, index, group)
    order = sorted(range(group.size), key=lambda u: -scores[u])
    return sorted(order[:keep])


def _keep_count(size: int, rule, index: int, group: CouplingGroup) -> int:
    keep = size - math.floor(rule.ratio * size + 0.5)
    if keep < 1:
        largest = (size - 1) / size
        raise PlanError(
            f"prune rule {index}: ratio {rule.ratio} leaves no {_unit_word(group)} of the {size} in "
            f"group '{group.name}'; use a ratio of at most {largest:.4g}"
        )
    if rule.round_to > 1:
        keep = min(size, math.ceil(keep / rule.round_to) * rule.round_to)
    return keep


def _kept_gqa_heads(group: CouplingGroup, rule, index: int, scores: list[float]) -> list[int]:
    per_kv, kv_heads = group.queries_per_kv, group.num_kv_heads
    count = kv_heads if rule.gqa == "groups" else per_kv
    removed = rule.ratio * count
    if abs(removed - round(removed)) > _TOLERANCE:
        possible = [round(k / count, 6) for k in range(count)]
        other = "queries" if rule.gqa == "groups" else "groups"
        other_count = per_kv if rule.gqa == "groups" else kv_heads
        raise PlanError(
            f"prune rule {index}: ratio {rule.ratio} cannot be met in group '{group.name}' "
            f"({group.size} query heads sharing {kv_heads} key/value heads) with gqa={rule.gqa!r}, "
            f"which removes heads in steps of 1/{count}; ratios that can: {possible}, or "
            f"{[round(k / other_count, 6) for k in range(other_count)]} with gqa={other!r}"
        )
    keep = count - round(removed)
    if rule.gqa == "groups":
        group_score = [sum(scores[g * per_kv:(g + 1) * per_kv]) for g in range(kv_heads)]
        kept_groups = sorted(sorted(range(kv_heads), key=lambda g: -group_score[g])[:keep])
        return [g * per_kv + j for g in kept_groups for j in range(per_kv)]
    kept = []
    for g in range(kv_heads):
        members = list(range(g * per_kv, (g + 1) * per_kv))
        kept += sorted(sorted(members, key=lambda u: -scores[u])[:keep])
    return kept


def _unit_word(group: CouplingGroup) -> str:
    return {"heads": "heads", "mlp_neurons": "neurons", "hidden": "channels"}[group.unit]


def _input_norms(group: CouplingGroup, rule, index: int, stats) -> dict[str, torch.Tensor] | None:
    """Return the input channel norms of the group's sites for the activation criterion."""
    if rule.criterion != "activation":
        return None
    missing = [s.path for s in group.sites if not stats or s.path not in stats]
    if missing:
        raise PlanError(
            f"prune rule {index} uses criterion 'activation', which needs calibration statistics "
            f"of {missing[:3]}; pass calibration=batches of model inputs to compress(), or use "
            "criterion 'magnitude'"
        )
    from ..plan import check_reached  # plan imports this module

    check_reached(f"prune rule {index}", group.sites, stats)
    return {s.path: (stats[s.path].channel_norms, stats[s.path].tokens) for s in group.sites}


def _unit_scores(group: CouplingGroup, rule, gm: fx.GraphModule, norms=None) -> list[float]:
    """Score each unit: L2 norm of its coupled weights, or a seeded random number.

    With input ``norms`` (the ``"activation"`` criterion, the Wanda measure), each
    weight ``W_ij`` of a linear site counts as ``|W_ij| * ||X_j||``, where ``||X_j||``
    is the norm of input channel ``j`` over the calibration tokens. A bias counts as
    a weight on a constant input of 1 per token.
    """
    if rule.criterion == "random":
        generator = torch.Generator().manual_seed(rule.seed)
        return torch.rand(group.size, generator=generator, dtype=torch.float64).tolist()
    squares = torch.zeros(group.size, dtype=torch.float64)
    for slot in group.slots:
        per_index = _squares_along(slot, gm, group, norms)
        units = group.unit_count(slot)
        per_unit = per_index[slot.offset: slot.offset + units * slot.width].reshape(units, slot.width).sum(1)
        if slot.per == "kv":
            # Every query head of a key/value group shares that group's key/value weights.
            per_unit = per_unit.repeat_interleave(group.queries_per_kv)
        squares += per_unit
    return squares.sqrt().tolist()


def _squares_along(slot: Slot, gm: fx.GraphModule, group: CouplingGroup, norms=None) -> torch.Tensor:
    """Return the sum of squares of a slot's tensor for each index of its axis."""
    if slot.kind == "param":
        tensor = fetch_attr(gm, slot.target).detach().to(torch.float64)
        dims = [d for d in range(tensor.dim()) if d != slot.axis]
        return tensor.pow(2).sum(dim=dims) if dims else tensor.pow(2)
    site = next(s for s in group.sites if s.path == slot.target)
    weight = site.weight(gm).detach().to(torch.float64)  # (out_features, in_features)
    bias_scale = 1.0
    if norms is not None:
        channel_norms, tokens = norms[site.path]
        weight = weight * channel_norms.to(weight.device)  # |W_ij| * ||X_j||
        bias_scale = float(tokens)
    if slot.axis == "in":
        return weight.pow(2).sum(0)
    squares = weight.pow(2).sum(1)
    bias = site.bias(gm)
    if bias is not None:
        squares = squares + bias.detach().to(torch.float64).pow(2) * bias_scale
    return squares


def _index_axes(selection: PruneSelection, gm: fx.GraphModule) -> None:
    """Turn kept units into kept indices for every tensor axis a pruned group touches."""
    removed: dict[tuple, set[int]] = {}
    for action in selection.actions:
        group = action.group
        for slot in group.slots:
            kept = set(group.slot_indices(slot, action.kept))
            covered = range(slot.offset, slot.offset + group.unit_count(slot) * slot.width)
            key = (slot.kind, slot.target, slot.axis)
            removed.setdefault(key, set()).update(i for i in covered if i not in kept)
    for (kind, target, axis), gone in removed.items():
        if kind == "site":
            site = selection.sites[target]
            size = site.out_features if axis == "out" else site.in_features
            selection.site_indices[(target, axis)] = [i for i in range(size) if i not in gone]
        else:
            size = fetch_attr(gm, target).shape[axis]
            selection.param_indices[(target, axis)] = [i for i in range(size) if i not in gone]
