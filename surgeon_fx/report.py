"""Reports on what a compression changed: per-site rows and parameter totals."""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from .passes.manager import journal_of


def rewrites(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """Return one row per rewritten site: path, role, layer, method, rank, sizes."""
    return journal_of(gm).rewrites


def count_params(module: nn.Module) -> int:
    """Return the number of distinct parameters of ``module`` (tied weights once)."""
    return sum(p.numel() for p in module.parameters())


def format_rewrites(rows: list[dict[str, Any]]) -> str:
    """Return ``rows`` as a plain-text table with a total line."""
    header = f"{'layer':>5}  {'role':<12} {'method':<12} {'rank':>5} {'before':>9} {'after':>9}  path"
    lines = [header, "-" * len(header)]
    for row in rows:
        layer = "-" if row.get("layer") is None else str(row["layer"])
        setting = row.get("rank", row.get("ratio", ""))
        lines.append(
            f"{layer:>5}  {row['role']:<12} {row['method']:<12} {setting!s:>5} "
            f"{row['params_before']:>9,} {row['params_after']:>9,}  {row['path']}"
        )
    before = sum(r["params_before"] for r in rows)
    after = sum(r["params_after"] for r in rows)
    if before:
        lines.append(f"{'':>5}  {'total':<12} {'':<12} {'':>5} {before:>9,} {after:>9,}  ({after / before:.1%} kept)")
    return "\n".join(lines)
