"""Helpers shared by the benchmark scripts: models, timing, machine description."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import transformers

RESULTS = Path(__file__).parent / "results"


def llama_config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int):
    return transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
    )


def time_interleaved(forwards: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Return the median seconds per call of each forward.

    Every forward runs ``warmup`` untimed calls first. The timed calls then go round
    the forwards in turn, so that load from other processes on a shared machine
    slows them alike and the ratios between them stay meaningful.
    """
    for forward in forwards.values():
        for _ in range(warmup):
            forward()
    times: dict[str, list[float]] = {name: [] for name in forwards}
    for _ in range(repeats):
        for name, forward in forwards.items():
            start = time.perf_counter()
            forward()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def machine() -> dict[str, object]:
    """Describe the CPU, core count, torch threads and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def write_json(name: str, payload: object) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2))
    return path
