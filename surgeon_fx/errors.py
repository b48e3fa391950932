"""Exception and warning classes raised by surgeon_fx.

Every error the library raises on bad input derives from :class:`SurgeonError`, so a
caller can catch one class. Messages name the module path, the offending value and
what to do next.
"""

from __future__ import annotations


class SurgeonError(Exception):
    """Base class of every error raised by surgeon_fx."""


class CaptureError(SurgeonError):
    """A model could not be turned into an FX graph module."""


class AnalysisError(SurgeonError):
    """A graph module does not have the structure an operation needs."""


class PlanError(SurgeonError):
    """A compression plan is invalid for the model it is applied to."""


class RewriteError(SurgeonError):
    """A pass failed while rewriting the graph; the graph module was rolled back."""


class RestoreError(SurgeonError):
    """A graph module cannot be restored to its original state."""


class CheckpointError(SurgeonError):
    """A saved compressed model cannot be read, or does not fit the model it is loaded into."""


class SurgeonWarning(UserWarning):
    """Warning for lossy, skipped or ignored actions."""
