"""Writing output files: JSON, and matplotlib figures as PNG on the Agg backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def pyplot():
    """Return ``matplotlib.pyplot`` on the Agg backend, which needs no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path, dpi: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(figure)


ROLE_ORDER = ("q", "k", "v", "qkv", "attn_out", "mlp_up", "mlp_gate", "mlp_gate_up", "mlp_down", "other")


def role_color(plt, role: str):
    """Return the colour of a role, the same in every figure (matplotlib's tab10 palette)."""
    return plt.get_cmap("tab10")(ROLE_ORDER.index(role) if role in ROLE_ORDER else 9)
