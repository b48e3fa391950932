"""Run the example scripts as a user would and check what they print."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_manager_quickstart(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "manager_quickstart.py"), str(tmp_path / "checkpoint")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line and not line[0].isspace())
    assert "state soft" in result.stdout
    assert "model.layers.3.mlp.down_proj" in result.stdout
    assert "model.embed_tokens" in result.stdout  # the hidden-size pruning
    assert int(lines["hard parameters"]) < int(lines["dense parameters"])
    assert lines["hard continuation"] == lines["soft continuation"]
    assert lines["reloaded continuation"] == lines["hard continuation"]
    assert (tmp_path / "checkpoint" / "manifest.json").is_file()
