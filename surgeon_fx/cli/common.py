"""Argument types and steps that several commands share."""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import fx, nn

from ..analysis import Analysis
from ..blockwise import is_blockwise
from ..calibration import CalibrationStats, calibrate
from ..plan import CALIBRATED_METHODS, Plan
from . import progress
from .errors import CommandError

MODEL_HELP = "a local Hugging Face model folder or a built-in name (listed by 'surgeon-fx --help')"
DEFAULT_BATCH_SIZE = 16


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {value}")
    return value


def check_calibration(plan: Plan, calib: Path | None) -> None:
    """Raise before any model is loaded if the text file is missing or the plan needs one."""
    if plan.sequential:
        # NOTE: the live model is compressed in one step (compress_model), which has no
        # block-by-block mode; only surgeon_fx.compress on a graph module has one.
        raise CommandError(
            "the plan sets 'sequential = true', which the command line does not support; remove it, "
            "or call surgeon_fx.compress(graph_module, plan, calibration=batches) from Python"
        )
    if calib is not None:
        if not calib.is_file():
            raise CommandError(f"calibration file {str(calib)!r} not found; give a text file with one sentence per line")
        return
    for index, rule in enumerate(plan.lrd):
        if rule.method in CALIBRATED_METHODS:
            raise CommandError(
                f"lrd rule {index} of the plan uses method {rule.method!r}, which needs calibration data; "
                "pass --calib TEXTFILE (one sentence per line) or use method 'svd'"
            )


def calibrate_plan_sites(
    gm: fx.GraphModule, analysis: Analysis, plan: Plan, batches: list, model: nn.Module | None = None
) -> CalibrationStats:
    """Collect input statistics of every site a rule of ``plan`` selects, with a progress bar.

    A blockwise capture records them on ``model``, the live model.
    """
    rules = [*plan.lrd, *plan.prune]
    selected = [site for site in analysis.sites if any(rule.selector.matches(site) for rule in rules)]
    live = model if is_blockwise(gm) else None
    with progress.bar(len(batches), "calibrating", "batch") as bar:
        return calibrate(gm, batches, selected, progress=progress.counter(bar), model=live)
