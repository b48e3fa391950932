"""The error class of the command line."""

from __future__ import annotations

from ..errors import SurgeonError


class CommandError(SurgeonError):
    """A command-line argument or input file is invalid; the message names it and the fix."""
