"""Per-layer compression settings in the style of transformer-surgeon.

A :class:`CompressionConfig` gives, for each *key*, one value per block of the
model (list index = block index)::

    CompressionConfig(
        lrd_rank_lists={"sa_qkv": [16, "full"], "mlp_down": [32, 32]},
        pruning_ratio_lists={"mlp_up": [0.25, 0.0]},
        pruning_ratio_skip_connections=0.1,
    )

=============  ==================================  ==============================
key            LRD applies to the roles            pruning removes
=============  ==================================  ==============================
``sa_qkv``     ``q``, ``k``, ``v``, ``qkv``        attention heads (``heads``)
``sa_out``     ``attn_out``                        (residual stream, see below)
``mlp_up``     ``mlp_up``, ``mlp_gate_up``, and    MLP neurons (``mlp_neurons``)
               ``mlp_gate`` unless ``mlp_gate``
               has its own list
``mlp_gate``   ``mlp_gate``                        MLP neurons (``mlp_neurons``)
``mlp_down``   ``mlp_down``                        (residual stream, see below)
=============  ==================================  ==============================

The outputs of ``sa_out`` and ``mlp_down`` are channels of the residual stream,
which every block shares, so they are pruned only through
``pruning_ratio_skip_connections`` (the fraction of the hidden size removed).

For a model with several towers (a vision encoder and a language model), nest the
keys under each tower's name as :attr:`Analysis.towers` lists it, such as
``{"vision": {"sa_qkv": [...]}, "text": {...}}`` for Qwen2.5-VL. A tower without a
recognised name is named by its stack prefix (``"model.layers"``), and a stack
prefix works in place of a tower name.

:meth:`CompressionConfig.to_plan` turns the lists into :class:`~surgeon_fx.plan.Plan`
rules (one rule per key and distinct value) and :meth:`CompressionConfig.from_plan`
reads such a plan back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .analysis import Analysis
from .errors import PlanError
from .plan import LRD_METHODS, LRDRule, Plan, PruneRule, Selector

LRD_ROLES = {
    "sa_qkv": ("q", "k", "v", "qkv"),
    "sa_out": ("attn_out",),
    "mlp_up": ("mlp_up", "mlp_gate", "mlp_gate_up"),
    "mlp_gate": ("mlp_gate",),
    "mlp_down": ("mlp_down",),
}
KEYS = tuple(LRD_ROLES)
PRUNE_UNITS = {"sa_qkv": "heads", "mlp_up": "mlp_neurons", "mlp_gate": "mlp_neurons"}
_RESIDUAL_KEYS = ("sa_out", "mlp_down")

FLAT = None  # tower name of a config whose keys are not nested under tower names


@dataclass
class CompressionConfig:
    """LRD ranks and pruning ratios per key and per block (see the module docstring).

    Args:
        pruning_ratio_lists: key -> list of ratios in [0, 1), or tower name ->
            such a mapping. A ratio of 0 leaves the block as it is.
        lrd_rank_lists: key -> list of positive ints or ``"full"``, or tower name
            -> such a mapping. ``"full"`` leaves the site as it is.
        pruning_ratio_skip_connections: fraction of the hidden size (the residual
            stream) to remove, in [0, 1), or tower name -> such a fraction.
        lrd_method: factorisation method of every LRD rule: ``"auto"`` (SVD-LLM
            when calibration inputs are given, plain SVD otherwise), ``"svd"``,
            ``"svd-llm"`` or ``"asvd"`` (the last two need calibration inputs).
        gqa: how head pruning treats grouped-query attention: ``"groups"`` removes
            whole key/value groups, ``"queries"`` removes query heads from every group.

    Raises:
        PlanError: an unknown key, a list that is not a list, or a value out of range.
    """

    pruning_ratio_lists: dict[str, Any] = field(default_factory=dict)
    lrd_rank_lists: dict[str, Any] = field(default_factory=dict)
    pruning_ratio_skip_connections: float | dict[str, float] = 0.0
    lrd_method: str = "auto"
    gqa: str = "groups"

    def __post_init__(self) -> None:
        self.lrd_ranks = _parse_lists(self.lrd_rank_lists, "lrd_rank_lists", _check_rank)
        self.pruning_ratios = _parse_lists(self.pruning_ratio_lists, "pruning_ratio_lists", _check_ratio)
        for block, lists in self.pruning_ratios.items():
            for key in _RESIDUAL_KEYS:
                if any(lists.get(key, [])):
                    raise PlanError(
                        f"pruning_ratio_lists{_where(block, key)}: the outputs of {key!r} are channels of "
                        "the residual stream, which all blocks share; prune them with "
                        "pruning_ratio_skip_connections instead"
                    )
            _check_up_gate_agree(lists, block)
        skip = self.pruning_ratio_skip_connections
        if isinstance(skip, dict):
            for tower, ratio in skip.items():
                _check_ratio(ratio, f"pruning_ratio_skip_connections[{tower!r}]")
        else:
            _check_ratio(skip, "pruning_ratio_skip_connections")
        if self.lrd_method not in LRD_METHODS:
            raise PlanError(f"lrd_method {self.lrd_method!r} is unknown; choose one of {list(LRD_METHODS)}")
        if self.gqa not in ("groups", "queries"):
            raise PlanError(f"gqa {self.gqa!r} is unknown; choose \"groups\" or \"queries\"")

    @property
    def blocks(self) -> list[str | None]:
        """Block prefixes the config names, or ``[None]`` for a flat config."""
        names = list(self.lrd_ranks)
        names += [b for b in self.pruning_ratios if b not in names]
        return names

    def validate(self, analysis: Analysis) -> None:
        """Check the config against a model's analysis, before anything changes.

        Raises:
            PlanError: the model lacks a block prefix the config names, or a flat
                config meets a model with several kinds of blocks. Also raised for a
                list whose length differs from the block count, and for a key whose
                roles the block does not have.
        """
        counts = block_counts(analysis)
        for name, kind in (("lrd_rank_lists", self.lrd_ranks), ("pruning_ratio_lists", self.pruning_ratios)):
            for block, lists in kind.items():
                prefix = _block_prefix(_tower_name(block, analysis), counts, name)
                roles = {s.role for s in analysis.sites if s.block is not None and s.tower == prefix}
                for key, values in lists.items():
                    where = f"{name}{_where(block, key)}"
                    if len(values) != counts[prefix]:
                        raise PlanError(
                            f"{where} has {len(values)} entries but {prefix!r} has {counts[prefix]} "
                            f"blocks; give one value per block"
                        )
                    if not roles & set(LRD_ROLES[key]) and any(_is_active(v) for v in values):
                        raise PlanError(
                            f"{where}: {prefix!r} has no site with role in {list(LRD_ROLES[key])}; "
                            f"its roles are {sorted(roles)}. Remove the key"
                        )
        if isinstance(self.pruning_ratio_skip_connections, dict):
            named: dict[str, str] = {}
            for key in self.pruning_ratio_skip_connections:
                tower = _block_prefix(_tower_name(key, analysis), counts, "pruning_ratio_skip_connections")
                if tower in named:
                    raise PlanError(
                        f"pruning_ratio_skip_connections names the tower {tower!r} twice, as {named[tower]!r} "
                        f"and {key!r}; keep one of them"
                    )
                named[tower] = key

    def to_plan(self, analysis: Analysis | None = None) -> Plan:
        """Return the :class:`Plan` these lists describe, validated against ``analysis`` if given.

        Blocks left as they are (rank ``"full"``, ratio 0) get no rule.
        """
        if analysis is not None:
            self.validate(analysis)
        lrd = []
        for block, lists in self.lrd_ranks.items():
            for key, values in lists.items():
                roles = LRD_ROLES[key]
                if key == "mlp_up" and "mlp_gate" in lists:
                    roles = tuple(r for r in roles if r != "mlp_gate")
                for value, layers in _group_layers(values):
                    if value != "full":
                        selector = Selector(roles=roles, layers=layers, towers=_towers(block))
                        lrd.append(LRDRule(selector=selector, rank=value, method=self.lrd_method))
        prune = []
        for block, lists in self.pruning_ratios.items():
            merged = _merge_neuron_ratios(lists)
            for key, values in merged.items():
                for value, layers in _group_layers(values):
                    if value:
                        selector = Selector(layers=layers, towers=_towers(block))
                        prune.append(PruneRule(selector=selector, unit=PRUNE_UNITS[key], ratio=value, gqa=self.gqa))
        skip = self.pruning_ratio_skip_connections
        for tower, ratio in (skip.items() if isinstance(skip, dict) else [(FLAT, skip)]):
            if ratio:
                prune.append(PruneRule(selector=Selector(towers=_towers(tower)), unit="hidden", ratio=ratio))
        return Plan(lrd=lrd, prune=prune)

    @classmethod
    def from_plan(cls, plan: Plan | dict, num_blocks: int | dict[str, int]) -> CompressionConfig:
        """Read a plan written by :meth:`to_plan` back into per-layer lists.

        ``num_blocks`` is the block count of a flat config, or tower name -> count.

        Raises:
            PlanError: a rule that per-layer lists cannot express (no ``layers``
                selector, roles that match no key, a ``{"keep": ...}`` rank, a budget).
        """
        plan = Plan.coerce(plan)
        counts = num_blocks if isinstance(num_blocks, dict) else {FLAT: num_blocks}
        methods = {rule.method for rule in plan.lrd}
        if len(methods) > 1:
            raise PlanError(f"the plan mixes LRD methods {sorted(methods)}; a CompressionConfig has one method")
        lrd: dict = {}
        for index, rule in enumerate(plan.lrd):
            where = f"lrd rule {index}"
            if rule.budget is not None or not (rule.rank == "full" or isinstance(rule.rank, int)):
                raise PlanError(f"{where}: rank {rule.rank!r} cannot be written as a per-layer list; "
                                "use an int or \"full\"")
            block, layers = _rule_block(rule.selector, counts, where)
            keys = _keys_for_roles(rule.selector.roles, where)
            for key in keys:
                lists = lrd.setdefault(block, {})
                entries = lists.setdefault(key, ["full"] * counts[block])
                for layer in layers:
                    entries[layer] = rule.rank
        for lists in lrd.values():
            if "mlp_up" in lists and "mlp_gate" not in lists and _up_rule_skips_gate(plan):
                lists["mlp_gate"] = ["full"] * len(lists["mlp_up"])
        ratios: dict = {}
        skip: float | dict[str, float] = 0.0
        gqa = "groups"
        for index, rule in enumerate(plan.prune):
            where = f"prune rule {index}"
            if rule.unit == "hidden" and rule.selector.towers:
                skip = {**(skip if isinstance(skip, dict) else {}), **dict.fromkeys(rule.selector.towers, rule.ratio)}
                continue
            if rule.unit == "hidden":
                skip = rule.ratio
                continue
            gqa = rule.gqa if rule.unit == "heads" else gqa
            block, layers = _rule_block(rule.selector, counts, where)
            key = "sa_qkv" if rule.unit == "heads" else "mlp_up"
            entries = ratios.setdefault(block, {}).setdefault(key, [0.0] * counts[block])
            for layer in layers:
                entries[layer] = rule.ratio
        return cls(
            pruning_ratio_lists=_unflatten(ratios),
            lrd_rank_lists=_unflatten(lrd),
            pruning_ratio_skip_connections=skip,
            lrd_method=methods.pop() if methods else "auto",
            gqa=gqa,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the config as plain JSON-serialisable data."""
        return {
            "pruning_ratio_lists": _unflatten(self.pruning_ratios),
            "lrd_rank_lists": _unflatten(self.lrd_ranks),
            "pruning_ratio_skip_connections": self.pruning_ratio_skip_connections,
            "lrd_method": self.lrd_method,
            "gqa": self.gqa,
        }


def block_counts(analysis: Analysis) -> dict[str, int]:
    """Return tower name -> number of blocks (highest layer index + 1)."""
    counts: dict[str, int] = {}
    for site in analysis.sites:
        if site.block is not None and site.role != "other":
            counts[site.tower] = max(counts.get(site.tower, 0), site.layer + 1)
    return counts


def _tower_name(block: str | None, analysis: Analysis) -> str | None:
    """Return the tower name of a config key, which may be a stack prefix."""
    return {prefix: name for name, prefix in analysis.towers.items()}.get(block, block)


def _parse_lists(data: Any, name: str, check) -> dict[str | None, dict[str, list]]:
    """Return ``{block or None: {key: list}}`` from a flat or nested mapping."""
    if not isinstance(data, dict):
        raise PlanError(f"{name} must be a dict of key -> list, got {type(data).__name__}")
    if all(isinstance(v, dict) for v in data.values()) and data:
        return {block: _parse_key_lists(lists, name, check, block) for block, lists in data.items()}
    return {FLAT: _parse_key_lists(data, name, check, FLAT)} if data else {}


def _parse_key_lists(data: dict, name: str, check, block: str | None) -> dict[str, list]:
    parsed = {}
    for key, values in data.items():
        where = f"{name}{_where(block, key)}"
        if key not in LRD_ROLES:
            nested = " (to nest keys under block prefixes, make every value a dict)" if isinstance(values, dict) else ""
            raise PlanError(f"{name}{_where(block, None)} has unknown key {key!r}{nested}; known keys are {list(KEYS)}")
        if not isinstance(values, (list, tuple)):
            raise PlanError(f"{where} must be a list with one value per block, got {values!r}")
        for index, value in enumerate(values):
            check(value, f"{where}[{index}]")
        parsed[key] = list(values)
    return parsed


def _check_rank(value: Any, where: str) -> None:
    if value == "full":
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PlanError(f"{where}: invalid rank {value!r}; give a positive int or \"full\"")


def _check_ratio(value: Any, where: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise PlanError(f"{where}: invalid pruning ratio {value!r}; give a number in [0, 1)")


def _check_up_gate_agree(lists: dict[str, list], block: str | None) -> None:
    up, gate = lists.get("mlp_up"), lists.get("mlp_gate")
    if up is None or gate is None:
        return
    for index, (a, b) in enumerate(zip(up, gate)):
        if a != b and a and b:
            raise PlanError(
                f"pruning_ratio_lists{_where(block, 'mlp_up')}[{index}] is {a} but "
                f"{_where(block, 'mlp_gate')}[{index}] is {b}; up and gate share their neurons, "
                "so give the same ratio or set one of them to 0"
            )


def _merge_neuron_ratios(lists: dict[str, list]) -> dict[str, list]:
    """Fold ``mlp_gate`` ratios into ``mlp_up``: both prune the same neurons."""
    merged = {k: list(v) for k, v in lists.items() if k not in _RESIDUAL_KEYS}
    gate = merged.pop("mlp_gate", None)
    if gate is not None:
        up = merged.get("mlp_up", [0.0] * len(gate))
        merged["mlp_up"] = [a or b for a, b in zip(up, gate)]
    return merged


def _group_layers(values: list) -> list[tuple[Any, tuple[int, ...]]]:
    """Return ``(value, layers)`` pairs, one per distinct value, in first-seen order."""
    groups: dict = {}
    for layer, value in enumerate(values):
        groups.setdefault(value, []).append(layer)
    return [(value, tuple(layers)) for value, layers in groups.items()]


def _is_active(value: Any) -> bool:
    return value not in ("full", 0, 0.0)


def _towers(block: str | None) -> tuple[str, ...] | None:
    return None if block is FLAT else (block,)


def _where(block: str | None, key: str | None) -> str:
    text = "" if block is FLAT else f"[{block!r}]"
    return text if key is None else f"{text}[{key!r}]"


def _block_prefix(block: str | None, counts: dict[str, int], name: str) -> str:
    if block is FLAT:
        if len(counts) != 1:
            raise PlanError(
                f"{name} is flat but the model has {len(counts)} kinds of blocks {sorted(counts)}; "
                "nest the keys under the tower name they apply to"
            )
        return next(iter(counts))
    if block not in counts:
        raise PlanError(f"{name}[{block!r}]: the model has no blocks {block!r}; its towers are {sorted(counts)}")
    return block


def _rule_block(selector: Selector, counts: dict, where: str) -> tuple[str | None, tuple[int, ...]]:
    block = FLAT
    if selector.towers is not None:
        if len(selector.towers) != 1:
            raise PlanError(f"{where}: towers {list(selector.towers)} do not name one tower")
        block = selector.towers[0]
    elif selector.paths is not None:
        if len(selector.paths) != 1 or not selector.paths[0].endswith(".*"):
            raise PlanError(f"{where}: paths {list(selector.paths)} do not name one block as \"<prefix>.*\"")
        block = selector.paths[0][:-2]
    if block not in counts:
        if list(counts) == [FLAT]:
            raise PlanError(
                f"{where} applies to the tower {block!r}, but num_blocks is one count; pass a dict of tower "
                f"name -> block count, such as {{{block!r}: {counts[FLAT]}}}"
            )
        raise PlanError(f"{where} applies to blocks {block!r}, but num_blocks gives {sorted(map(str, counts))}")
    if selector.layers is None:
        return block, tuple(range(counts[block]))
    outside = [layer for layer in selector.layers if layer >= counts[block]]
    if outside:
        raise PlanError(f"{where}: layers {outside} are beyond the {counts[block]} blocks of {block!r}")
    return block, selector.layers


def _keys_for_roles(roles: tuple[str, ...] | None, where: str) -> list[str]:
    if roles is None:
        raise PlanError(f"{where} selects every role, including 'other'; per-layer lists need a 'roles' selector")
    for key, key_roles in LRD_ROLES.items():
        if set(roles) == set(key_roles):
            return [key]
    if set(roles) == {"mlp_up", "mlp_gate_up"}:
        return ["mlp_up"]
    raise PlanError(f"{where}: roles {list(roles)} do not match one key's roles {LRD_ROLES}")


def _up_rule_skips_gate(plan: Plan) -> bool:
    return any(r.selector.roles is not None and set(r.selector.roles) == {"mlp_up", "mlp_gate_up"} for r in plan.lrd)


def _unflatten(data: dict) -> dict:
    if set(data) == {FLAT}:
        return {k: list(v) for k, v in data[FLAT].items()}
    return {block: {k: list(v) for k, v in lists.items()} for block, lists in data.items()}
