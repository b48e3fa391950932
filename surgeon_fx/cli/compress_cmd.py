"""``surgeon-fx compress MODEL --plan PLAN --out DIR``: compress a model and save it.

The live model is compressed (as :func:`surgeon_fx.compress_model` does), so that
pruning and LRD both apply and the result runs as the original model class. DIR
then contains what :func:`surgeon_fx.save` writes (``model.safetensors`` and
``manifest.json``), the model's original ``config.json`` and its tokenizer files.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path
from typing import Any

from ..analysis import analyze
from ..live import apply_plan, capture_for_analysis, join_hidden_groups, journal_of_model, resolve_plan
from ..persist import MANIFEST, WEIGHTS, save
from ..plan import Plan
from ..report import count_params
from . import progress
from .common import DEFAULT_BATCH_SIZE, MODEL_HELP, calibrate_plan_sites, check_calibration, positive_int
from .errors import CommandError
from .models import load_model

logger = logging.getLogger(__name__)


def add_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "compress", parents=[common], help="compress a model as a plan specifies and save it",
        description="Compress MODEL as PLAN specifies, save it to DIR, and print one row per changed "
        "site with the parameter totals. DIR receives model.safetensors and manifest.json "
        "(load them with surgeon_fx.load), the original config.json and the tokenizer files.",
    )
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--plan", metavar="PLAN", type=Path, required=True,
                        help="plan file: TOML, or JSON when the name ends in .json (format: docs/plans.md)")
    parser.add_argument("--out", metavar="DIR", type=Path, required=True, help="folder to write the compressed model to")
    parser.add_argument("--hard", action="store_true",
                        help="make the model physically smaller and drop the originals; without it the "
                        "compression is soft: same shapes, masks and factors, reversible with "
                        "surgeon_fx.restore_model after loading")
    parser.add_argument("--calib", metavar="TEXTFILE", type=Path,
                        help="UTF-8 text file, one sentence per line, for calibrated methods (svd-llm, asvd); "
                        "tokenised with the model folder's tokenizer")
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, metavar="N",
                        help=f"calibration sentences per batch (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--force", action="store_true", help="overwrite a compressed model already in DIR")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    plan = Plan.from_file(args.plan)
    check_calibration(plan, args.calib)
    _check_out(args.out, args.force)
    loaded = load_model(args.model)
    model = loaded.model
    base_config = copy.deepcopy(getattr(model, "config", None))  # hard pruning edits model.config
    batches = loaded.tokenize_file(args.calib, args.batch_size) if args.calib is not None else None
    kwargs = loaded.example_inputs()

    start = time.perf_counter()
    gm = capture_for_analysis(model, (), kwargs, calibrated=batches is not None)
    analysis = analyze(gm)
    plan = resolve_plan(plan, analysis)
    join_hidden_groups(model, analysis, plan, (), kwargs)
    stats = None
    if batches is not None:
        stats = calibrate_plan_sites(gm, analysis, plan, batches, model)
    params_before = count_params(model)
    with progress.bar(None, "compressing", "site") as bar:

        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        apply_plan(model, analysis, plan, stats, (), kwargs, hard=args.hard, progress=advance)
    logger.info("compressed %s in %.1f s", loaded.name, time.perf_counter() - start)

    save(model, args.out)
    if base_config is not None:
        base_config.save_pretrained(str(args.out))
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(str(args.out))

    journal = journal_of_model(model)
    print(format_schemes(journal.rewrites, journal.state))
    print()
    print(format_totals(params_before, count_params(model), journal.rewrites, journal.state))
    print(f"saved to {args.out}")
    return 0


def format_schemes(rows: list[dict[str, Any]], state: str) -> str:
    """Return one line per compressed site: layer, role, method, rank, pruned ratio, parameters."""
    header = (f"{'layer':>5}  {'role':<11} {'method':<24} {'rank':>5} {'ratio':>6} "
              f"{'before':>9} {'after':>9}  path")
    lines = [header, "-" * len(header)]
    for row in rows:
        layer = "-" if row.get("layer") is None else str(row["layer"])
        rank = "-" if row.get("rank") is None else str(row["rank"])
        ratio = "-" if row.get("ratio") is None else f"{row['ratio']:.3g}"
        lines.append(f"{layer:>5}  {row['role']:<11} {row['method']:<24} {rank:>5} {ratio:>6} "
                     f"{row['params_before']:>9,} {row['params_after']:>9,}  {row['path']}")
    before = sum(row["params_before"] for row in rows)
    after = sum(row["params_after"] for row in rows)
    if before:
        lines.append(f"{'':>5}  {'total':<11} {'':<24} {'':>5} {'':>6} {before:>9,} {after:>9,}  "
                     f"({after / before:.1%} of the selected sites' parameters, {state})")
    return "\n".join(lines)


def format_totals(before: int, now: int, rows: list[dict[str, Any]], state: str) -> str:
    """Return the model's parameter totals; a soft compression also gets its size once hard."""
    lines = [f"parameters: {before:,} -> {now:,} ({now / before:.1%})"]
    hard = before - sum(row["params_before"] - row["params_after"] for row in rows)
    if state == "soft" and hard != now:
        lines.append(f"once hard:  {hard:,} ({hard / before:.1%}); soft pruning keeps masked weights in place")
    return "\n".join(lines)


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {str(out)!r} is a file; give a folder")
    existing = [name for name in (MANIFEST, WEIGHTS) if (out / name).exists()]
    if existing and not force:
        raise CommandError(f"{str(out)!r} already contains {existing[0]}; pass --force to overwrite it or choose another --out")
