"""The pass manager and its journal of inverse rewrites.

Every change to a graph module goes through :class:`PassManager.run`. Before a pass
runs, the manager snapshots the graph. While it runs, the pass swaps submodules only
through :class:`Rewriter`, which records what was at each path. The snapshot and
the recorded modules are the pass's inverse. :func:`undo` applies inverses last-in
first-out, which is how both rollback after a failure and ``restore`` work.

The journal lives in ``gm.meta["surgeon_fx"]`` so that it travels with the module.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import fx, nn

from .._fx_utils import replace_submodule
from ..errors import RewriteError

logger = logging.getLogger(__name__)

JOURNAL_KEY = "surgeon_fx"


@dataclass
class ModuleSwap:
    """A submodule replaced at ``path``; ``previous`` is ``None`` once made permanent."""

    path: str
    previous: nn.Module | None


@dataclass
class JournalEntry:
    """A record of one pass: its changes, and the inverse that undoes them while ``hard`` is False."""

    pass_name: str
    graph_before: fx.Graph | None
    swaps: list[ModuleSwap] = field(default_factory=list)
    rewrites: list[dict[str, Any]] = field(default_factory=list)
    hard: bool = False


@dataclass
class Journal:
    entries: list[JournalEntry] = field(default_factory=list)
    plan: dict[str, Any] | None = None
    stats: Any = None  # calibration statistics of the plan, to make a soft prune hard

    @property
    def state(self) -> str:
        """``"none"``, ``"soft"`` (reversible) or ``"hard"`` (permanent)."""
        if not self.entries:
            return "none"
        return "hard" if any(e.hard for e in self.entries) else "soft"

    @property
    def rewrites(self) -> list[dict[str, Any]]:
        return [r for entry in self.entries for r in entry.rewrites]


def journal_of(gm: fx.GraphModule) -> Journal:
    """Return the journal of ``gm``, creating an empty one."""
    journal = gm.meta.get(JOURNAL_KEY)
    if journal is None:
        journal = gm.meta[JOURNAL_KEY] = Journal()
    return journal


class Rewriter:
    """The only way a pass changes submodules: every swap is recorded for undo."""

    def __init__(self, gm: fx.GraphModule, entry: JournalEntry) -> None:
        self.gm = gm
        self.entry = entry

    def swap_module(self, path: str, module: nn.Module | None) -> None:
        previous = replace_submodule(self.gm, path, module)
        self.entry.swaps.append(ModuleSwap(path, previous))

    def record(self, **rewrite: Any) -> None:
        """Record a summary of one rewrite (site, method, sizes) for reports."""
        self.entry.rewrites.append(rewrite)


@dataclass
class PassResult:
    """The result of a pass: the graph module and whether it changed."""

    gm: fx.GraphModule
    modified: bool


Pass = Callable[[fx.GraphModule, Rewriter], PassResult]


class PassManager:
    """Run passes on a graph module, journal their inverses, roll back on failure."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.journal = journal_of(gm)

    def run(self, passes: list[tuple[str, Pass]]) -> list[PassResult]:
        """Run ``passes`` in order; if one raises, undo all of them and raise RewriteError."""
        start = len(self.journal.entries)
        results = []
        for name, run_pass in passes:
            entry = JournalEntry(pass_name=name, graph_before=snapshot_graph(self.gm.graph))
            self.journal.entries.append(entry)
            try:
                result = run_pass(self.gm, Rewriter(self.gm, entry))
                self.gm.graph.lint()
                self.gm.recompile()
            except Exception as err:
                done = [e.pass_name for e in self.journal.entries[start:-1]]
                undo(self.gm, len(self.journal.entries) - start)
                raise RewriteError(
                    f"pass {name!r} failed with {type(err).__name__}: {err}; passes run before it: "
                    f"{done or 'none'}. The graph module was rolled back to its state before them"
                ) from err
            logger.info("pass %s rewrote %d sites", name, len(entry.rewrites))
            results.append(result)
        return results


def snapshot_graph(graph: fx.Graph) -> fx.Graph:
    """Return a copy of ``graph`` that regenerates the same code (node names included)."""
    with warnings.catch_warnings():
        # Copying the pytree spec of an exported module emits a torch FutureWarning.
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(graph)


def undo(gm: fx.GraphModule, count: int) -> None:
    """Undo the last ``count`` journal entries of ``gm``, last first."""
    journal = journal_of(gm)
    for _ in range(count):
        entry = journal.entries.pop()
        for swap in reversed(entry.swaps):
            replace_submodule(gm, swap.path, swap.previous)
        gm.graph = entry.graph_before
    gm.recompile()


def make_permanent(gm: fx.GraphModule) -> None:
    """Drop the inverses of every journal entry so that originals can be freed."""
    for entry in journal_of(gm).entries:
        entry.graph_before = None
        entry.swaps = [ModuleSwap(s.path, None) for s in entry.swaps]
        entry.hard = True
