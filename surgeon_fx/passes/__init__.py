"""Rewrite passes and the pass manager that journals their inverses."""

from .decompose_linear import decompose_linear
from .manager import Journal, JournalEntry, PassManager, PassResult, journal_of, undo

__all__ = ["Journal", "JournalEntry", "PassManager", "PassResult", "decompose_linear", "journal_of", "undo"]
