"""The :class:`Analysis` of a graph module: its linear sites, roles and attention ops."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

from torch import fx

from ..errors import AnalysisError, SurgeonWarning
from .attention import AttentionOp, find_attention
from .linear_sites import LinearSite, find_linear_sites
from .mlp import assign_mlp_roles
from .towers import tower_names, tower_of_path

logger = logging.getLogger(__name__)


@dataclass
class Analysis:
    """Linear sites of a graph module with their roles, and its attention operations.

    An analysis describes one state of one graph: node references go stale when the
    graph is rewritten, so analyse again after ``compress`` or ``restore``.
    """

    gm: fx.GraphModule = field(repr=False)
    sites: list[LinearSite]
    attention: list[AttentionOp]
    _groups: list | None = field(default=None, init=False, repr=False)

    def site(self, path: str) -> LinearSite:
        """Return the site whose module path is ``path``."""
        for site in self.sites:
            if site.path == path:
                return site
        raise AnalysisError(f"no linear site at path {path!r}; known paths start with "
                            f"{[s.path for s in self.sites[:3]]}")

    def replace_groups(self, unit: str, groups: list) -> None:
        """Replace the coupling groups of ``unit`` with ``groups`` (found another way)."""
        self._groups = [g for g in self.groups if g.unit != unit] + list(groups)

    @property
    def layers(self) -> list[int]:
        return sorted({s.layer for s in self.sites if s.layer is not None})

    @property
    def blocks(self) -> list[str]:
        """Prefixes of the repeated blocks, such as ``model.layers``."""
        seen: list[str] = []
        for site in self.sites:
            if site.block is not None and site.block not in seen:
                seen.append(site.block)
        return seen

    @property
    def towers(self) -> dict[str, str]:
        """Tower name -> stack prefix, such as ``{"vision": "model.visual.blocks"}``."""
        towers: dict[str, str] = {}
        for site in self.sites:
            if site.block is not None and site.tower is not None:
                towers.setdefault(site.tower, site.block)
        return towers

    @property
    def groups(self) -> list:
        """Coupling groups for structured pruning (:class:`~surgeon_fx.analysis.coupling.CouplingGroup`).

        Computed on first access and cached with this analysis.
        """
        if self._groups is None:
            from .coupling import find_groups

            self._groups = find_groups(self)
        return self._groups

    def sites_with_role(self, *roles: str) -> list[LinearSite]:
        return [s for s in self.sites if s.role in roles]

    def table(self) -> str:
        """Return a plain-text table of the sites, grouped by layer."""
        # A model with several towers (vision and text) gets a tower column.
        width = max(len(name) for name in self.towers) if len(self.towers) > 1 else 0
        tower_header = f"{'tower':<{width}}  " if width else ""
        header = f"{tower_header}{'layer':>5}  {'role':<12} {'in':>6} {'out':>6}  path"
        lines = [header, "-" * len(header)]
        for site in self.sites:
            layer = "-" if site.layer is None else str(site.layer)
            tower = f"{site.tower or '-':<{width}}  " if width else ""
            lines.append(
                f"{tower}{layer:>5}  {site.role:<12} {site.in_features:>6} {site.out_features:>6}  {site.path}"
            )
        if self.attention:
            lines.append("")
            lines.append(f"{tower_header}{'layer':>5}  {'kind':<6} {'heads':>5} {'kv':>4} {'head_dim':>8}  rotary")
            for op in self.attention:
                layer = "-" if op.layer is None else str(op.layer)
                tower = f"{op.tower or '-':<{width}}  " if width else ""
                lines.append(
                    f"{tower}{layer:>5}  {op.kind:<6} {op.num_heads!s:>5} {op.num_kv_heads!s:>4} "
                    f"{op.head_dim!s:>8}  {'yes' if op.rotary else 'no'}"
                )
        return "\n".join(lines)

    def __str__(self) -> str:
        counts = {}
        for site in self.sites:
            counts[site.role] = counts.get(site.role, 0) + 1
        summary = ", ".join(f"{role}={n}" for role, n in counts.items())
        return f"Analysis: {len(self.sites)} linear sites ({summary}), {len(self.attention)} attention ops\n{self.table()}"


def analyze(gm: fx.GraphModule) -> Analysis:
    """Find the linear sites of ``gm`` and give each a role from the graph's structure.

    Example::

        >>> gm = surgeon_fx.capture(model, (input_ids,), {"use_cache": False})
        >>> analysis = surgeon_fx.analyze(gm)
        >>> analysis.site("model.layers.0.self_attn.q_proj").role
        'q'
    """
    if not isinstance(gm, fx.GraphModule):
        raise AnalysisError(
            f"analyze() expects a torch.fx.GraphModule, got {type(gm).__name__}; "
            "call surgeon_fx.capture(model, args) first"
        )
    sites = find_linear_sites(gm)
    _assign_towers(sites)
    by_node = {site.node: site for site in sites}
    attention = _one_per_projection(find_attention(by_node, gm.graph))
    for op in attention:
        op.tower = op.q.tower
        _assign_attention_roles(op)
    if not attention:
        warnings.warn(
            "no attention operation found in the graph; every linear site gets role 'other'",
            SurgeonWarning,
            stacklevel=2,
        )
    else:
        assign_mlp_roles(sites, by_node)
    logger.debug("analysis found %d sites and %d attention ops", len(sites), len(attention))
    return Analysis(gm=gm, sites=sites, attention=attention)


def _assign_towers(sites: list[LinearSite]) -> None:
    stacks = list(dict.fromkeys(site.block for site in sites if site.block is not None))
    names = tower_names(stacks)
    for site in sites:
        site.tower = names[site.block] if site.block is not None else tower_of_path(site.path, names)


def _one_per_projection(ops: list[AttentionOp]) -> list[AttentionOp]:
    """Keep the first attention op of each set of q/k/v projections.

    Attention computed chunk by chunk (one chunk per image or window) calls the
    attention op once per chunk on slices of the same projections.
    """
    kept: dict[tuple, AttentionOp] = {}
    for op in ops:
        kept.setdefault((op.q, op.k, op.v), op)
    return list(kept.values())


def _assign_attention_roles(op: AttentionOp) -> None:
    if op.fused_qkv:
        op.q.role = "qkv"
        op.q.attention = op
    else:
        for role, site in (("q", op.q), ("k", op.k), ("v", op.v)):
            site.role = role
            site.attention = op
    if op.out is not None:
        op.out.role = "attn_out"
        op.out.attention = op
