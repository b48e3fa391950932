"""``CompressionSchemesManager``: the manager API of transformer-surgeon over surgeon_fx.

A *scheme* is what one site of the model gets: LRD to a rank, pruning at a ratio, or
both. The manager captures the model once, validates the configuration against
its analysis, lists the schemes, and applies or restores all of them::

    manager = CompressionSchemesManager(model, config)
    manager.apply_all(hard=False)   # reversible; factors and masks are trainable
    print(manager)                  # one row per scheme
    manager.restore_all()           # the original modules, bit for bit

A live ``nn.Module`` goes through :func:`surgeon_fx.compress_model`; a
``GraphModule`` through :func:`surgeon_fx.compress`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Iterable

from torch import fx, nn

from .analysis import analyze
from .api import compress, restore
from .capture import capture
from .config import CompressionConfig
from .errors import SurgeonError
from .live import (
    apply_plan,
    calibrate_plan,
    capture_for_analysis,
    example_inputs,
    join_hidden_groups,
    journal_of_model,
    make_permanent,
    preview,
    resolve_plan,
    restore_model,
)
from .passes.manager import journal_of
from .plan import Plan


@dataclass(frozen=True)
class Scheme:
    """The compression of one site.

    ``method`` is ``"lrd:svd"``, ``"prune:heads"``, or both joined by ``+``. ``ratio``
    is the fraction of the site's weight entries that pruning removes, and
    ``params_after`` counts the site once hard-compressed.
    """

    layer: int | None
    path: str
    role: str
    method: str
    rank: int | None
    ratio: float | None
    params_before: int
    params_after: int
    state: str  # "pending", "soft" or "hard"

    @classmethod
    def from_row(cls, row: dict[str, Any], state: str) -> Scheme:
        return cls(
            layer=row.get("layer"), path=row["path"], role=row["role"], method=row["method"],
            rank=row.get("rank"), ratio=row.get("ratio"), params_before=row["params_before"],
            params_after=row["params_after"], state=state,
        )


class Schemes(list):
    """A list of :class:`Scheme` that can be filtered."""

    def filter(self, *, layer: int | Iterable[int] | None = None, role: str | Iterable[str] | None = None,
               path: str | None = None) -> Schemes:
        """Return the schemes in ``layer``, with ``role``, and whose path matches the glob ``path``."""
        layers = _as_set(layer, int)
        roles = _as_set(role, str)
        return Schemes(
            s for s in self
            if (layers is None or s.layer in layers)
            and (roles is None or s.role in roles)
            and (path is None or fnmatch.fnmatchcase(s.path, path))
        )


class CompressionSchemesManager:
    """Apply and restore a :class:`CompressionConfig` or :class:`Plan` on one model.

    Args:
        model: a live ``nn.Module`` (a Hugging Face model or your own) or a ``GraphModule``.
        config_or_plan: a :class:`CompressionConfig`, a :class:`Plan`, a plan dict or file.
        args, kwargs: example inputs for capture; a Hugging Face model's
            ``dummy_inputs`` are used when both are empty.
        calibration: batches of model inputs for the ``svd-llm`` and ``asvd`` methods.
        strategy: how to capture the model: ``"auto"``, ``"whole"`` or ``"blockwise"``
            (see :func:`surgeon_fx.capture`).

    Raises:
        PlanError: the configuration does not fit the model; nothing was changed.
        SurgeonError: the model is compressed already.
    """

    def __init__(self, model: nn.Module, config_or_plan: CompressionConfig | Plan | dict | Any,
                 args: Any = (), kwargs: dict | None = None, *, calibration: Iterable[Any] | None = None,
                 strategy: str = "auto") -> None:
        self.model = model
        self.config = config_or_plan
        self.graph_mode = isinstance(model, fx.GraphModule)
        if self.state != "pending":
            raise SurgeonError(
                f"the model is {self.state}-compressed already; restore it first (surgeon_fx.restore_model, "
                "or surgeon_fx.restore for a graph module) or keep using the manager that compressed it"
            )
        if self.graph_mode:
            self.args, self.kwargs = args, kwargs
            self._gm = capture(model, args, kwargs, strategy=strategy)
        else:
            self.args, self.kwargs = example_inputs(model, args, kwargs)
            # NOTE: the graph module shares its parameters with ``model``, so this one
            # capture stays valid while the user changes weights in place. It goes
            # stale if the user replaces submodules between calls.
            self._gm = capture_for_analysis(model, self.args, self.kwargs, calibration is not None, strategy)
        self._analysis = analyze(self._gm)
        self.plan = resolve_plan(config_or_plan, self._analysis)
        if not self.graph_mode:
            join_hidden_groups(model, self._analysis, self.plan, self.args, self.kwargs)
        self._calibration = None if calibration is None else list(calibration)
        self._stats = calibrate_plan(
            self._gm, self._analysis, self.plan, self._calibration, None if self.graph_mode else model
        )
        self._pending = preview(self._analysis, self.plan, self._stats, model=None if self.graph_mode else model)

    @property
    def state(self) -> str:
        """``"pending"``, ``"soft"`` or ``"hard"``."""
        journal = journal_of(self.model) if self.graph_mode else journal_of_model(self.model)
        if journal is None or journal.state == "none":
            return "pending"
        return journal.state

    @property
    def schemes(self) -> Schemes:
        """One :class:`Scheme` per site the configuration changes, in graph order."""
        state = self.state
        if state == "pending":
            rows = self._pending
        elif self.graph_mode:
            rows = _merge_graph_rows(self._pending, journal_of(self.model).rewrites)
        else:
            rows = journal_of_model(self.model).rewrites
        return Schemes(Scheme.from_row(row, state) for row in rows)

    def apply_all(self, hard: bool = False) -> nn.Module:
        """Apply every scheme and return the model.

        Soft twice is a no-op with a warning (fine-tuned factors and masks are kept);
        ``hard=True`` after soft makes the current factors and masks permanent.
        """
        if self.graph_mode:
            return compress(self.model, self.plan, hard=hard, stats=self._stats)
        if self.state == "soft" and hard:
            return make_permanent(self.model, self.args, self.kwargs)
        if self.state != "pending":
            from .live import compress_model

            return compress_model(self.model, self.plan, self.args, self.kwargs, hard=hard)
        return apply_plan(self.model, self._analysis, self.plan, self._stats, self.args, self.kwargs, hard=hard,
                          calibration=self._calibration)

    def restore_all(self) -> nn.Module:
        """Undo every soft scheme and return the model with its original modules.

        Raises:
            RestoreError: the schemes were applied hard.
        """
        return restore(self.model) if self.graph_mode else restore_model(self.model)

    def table(self) -> str:
        """Return the schemes as a plain-text table with a total line."""
        schemes = self.schemes
        header = (f"{'layer':>5}  {'role':<11} {'method':<32} {'rank':>5} {'ratio':>6} "
                  f"{'before':>9} {'after':>9}  {'state':<7}  path")
        lines = [header, "-" * len(header)]
        for s in schemes:
            layer = "-" if s.layer is None else str(s.layer)
            rank = "-" if s.rank is None else str(s.rank)
            ratio = "-" if s.ratio is None else f"{s.ratio:.3g}"
            lines.append(
                f"{layer:>5}  {s.role:<11} {s.method:<32} {rank:>5} {ratio:>6} "
                f"{s.params_before:>9,} {s.params_after:>9,}  {s.state:<7}  {s.path}"
            )
        before = sum(s.params_before for s in schemes)
        after = sum(s.params_after for s in schemes)
        if before:
            lines.append(f"{'':>5}  {'total':<11} {'':<32} {'':>5} {'':>6} {before:>9,} {after:>9,}  "
                         f"({after / before:.1%} of the selected sites' parameters)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return (f"CompressionSchemesManager({type(self.model).__name__}, {len(self._pending)} schemes, "
                f"state {self.state})\n{self.table()}")

    def __repr__(self) -> str:
        return f"CompressionSchemesManager({type(self.model).__name__}, schemes={len(self._pending)}, state={self.state!r})"


def _merge_graph_rows(pending: list[dict], rewrites: list[dict]) -> list[dict]:
    """Return one row per site from the graph journal, which has a row per pass and site.

    The parameter count after compression is the last pass's; the other fields
    come from the plan's preview.
    """
    after = {row["path"]: row["params_after"] for row in rewrites}
    return [{**row, "params_after": after.get(row["path"], row["params_after"])} for row in pending]


def _as_set(value, kind: type) -> set | None:
    if value is None:
        return None
    if isinstance(value, kind):
        return {value}
    return set(value)
