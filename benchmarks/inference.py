"""Forward latency of compressed Llama against dense and against the FLOP limit.

Run: ``.venv/bin/python benchmarks/inference.py [--repeats 4] [--batches 1 8] [--threads 1]``.

The model is a ``LlamaModel`` with random weights from ``LlamaConfig`` (hidden 1024,
intermediate 2816, 8 layers, 16 heads, 4 key/value heads, vocabulary 32000) at
sequence 128. Each plan is applied with ``surgeon_fx.compress_model`` (hard, and soft
for two plans to show the cost of the reversible form) to its own copy of the model.

For every variant and batch size the script counts FLOPs with
``torch.utils.flop_counter.FlopCounterMode`` (matrix multiplications and attention),
so the ideal speedup is ``dense FLOPs / variant FLOPs``. The measured speedup is
``dense median / variant median`` from interleaved timed calls in one run, in eager
mode and under ``torch.compile`` (inductor), each against the dense model in the same
mode. Efficiency is measured speedup divided by ideal speedup. Variants whose eager
efficiency falls under ``--profile-below`` are profiled with ``torch.profiler`` next
to the dense model, and the operators that take the most time are stored.

Writes ``benchmarks/results/inference.json`` and ``benchmarks/results/inference.png``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
import warnings

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

import surgeon_fx
from surgeon_fx.report import count_params

from common import RESULTS, llama_config, machine, time_interleaved, write_json

SEQUENCE = 128
VOCAB = 32000
ALL_LINEAR = ["q", "k", "v", "attn_out", "mlp_gate", "mlp_up", "mlp_down"]

# name -> (plan, hard)
VARIANTS: dict[str, tuple[dict, bool]] = {
    "lrd 50% params": ({"lrd": [{"roles": ALL_LINEAR, "rank": {"keep": 0.5}}]}, True),
    "prune 50% mlp neurons": ({"prune": [{"unit": "mlp_neurons", "ratio": 0.5}]}, True),
    "prune 50% kv groups": ({"prune": [{"unit": "heads", "ratio": 0.5, "gqa": "groups"}]}, True),
    "mix": (
        {
            "prune": [
                {"unit": "mlp_neurons", "ratio": 0.25},
                {"unit": "heads", "ratio": 0.25, "gqa": "groups"},
            ],
            "lrd": [{"roles": ["q", "attn_out"], "rank": {"keep": 0.5}}],
        },
        True,
    ),
    "soft lrd 50% params": ({"lrd": [{"roles": ALL_LINEAR, "rank": {"keep": 0.5}}]}, False),
    "soft prune 50% mlp neurons": ({"prune": [{"unit": "mlp_neurons", "ratio": 0.5}]}, False),
}
MIX_DESCRIPTION = "25% of MLP neurons and 1 of 4 kv groups pruned, then q and attn_out decomposed to 50%"

logger = logging.getLogger("inference")


def build_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    dense = transformers.LlamaModel(llama_config(1024, 2816, 8, 16, 4, VOCAB)).eval()
    example = torch.randint(0, VOCAB, (1, SEQUENCE), generator=torch.Generator().manual_seed(1))
    inputs = ((example,), {"use_cache": False})
    models = {"dense": dense}
    # Soft variants first: a copy of a soft model made hard reuses its SVD factors,
    # which saves most of the compression time of the LRD variant.
    for name in sorted(VARIANTS, key=lambda n: VARIANTS[n][1]):
        plan, hard = VARIANTS[name]
        soft_name = f"soft {name}"
        start = time.perf_counter()
        if hard and soft_name in models:
            model = copy.deepcopy(models[soft_name])
        else:
            model = copy.deepcopy(dense)
        surgeon_fx.compress_model(model, plan, *inputs, hard=hard)
        logger.info("compressed %s in %.1f s", name, time.perf_counter() - start)
        models[name] = model
    return {"dense": dense, **{name: models[name] for name in VARIANTS}}


def count_flops(model: torch.nn.Module, ids: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, use_cache=False)
    return counter.get_total_flops()


def measure_batch(models, batch: int, modes: list[str], warmup: int, repeats: int) -> list[dict]:
    ids = torch.randint(0, VOCAB, (batch, SEQUENCE), generator=torch.Generator().manual_seed(2))
    flops = {name: count_flops(model, ids) for name, model in models.items()}
    with torch.no_grad():
        reference = models["dense"](ids, use_cache=False).last_hidden_state
    rows = []
    for mode in modes:
        if mode == "inductor":
            # Every variant compiles the same LlamaModel.forward code object, and Dynamo
            # falls back to eager without an error once that object passes its
            # recompile limit (8 in torch 2.13), so start each batch from an empty cache.
            torch._dynamo.reset()
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(models))
        forwards = {}
        compile_s = {}
        outputs = {}
        for name, model in models.items():
            hard = name == "dense" or VARIANTS[name][1]
            if mode == "inductor" and not hard:
                continue  # soft mode is measured eager only
            runner = model if mode == "eager" else torch.compile(model, dynamic=False)
            forwards[name] = _forward(runner, ids)
            start = time.perf_counter()
            outputs[name] = forwards[name]().last_hidden_state  # compiles under inductor
            compile_s[name] = time.perf_counter() - start
            logger.info("batch %d %s %s: first call %.1f s", batch, mode, name, compile_s[name])
        medians = time_interleaved(forwards, warmup, repeats)
        for name, median in medians.items():
            cosine = torch.nn.functional.cosine_similarity(outputs[name].flatten(1), reference.flatten(1)).mean()
            measured = medians["dense"] / median
            ideal = flops["dense"] / flops[name]
            rows.append({
                "batch": batch,
                "mode": mode,
                "variant": name,
                "hard": name == "dense" or VARIANTS[name][1],
                "params": count_params(models[name]),
                "gflops": flops[name] / 1e9,
                "median_ms": median * 1000,
                "first_call_s": compile_s[name],
                "speedup": measured,
                "ideal_speedup": ideal,
                "efficiency": measured / ideal,
                "cosine_vs_dense": float(cosine),
            })
    return rows


def _forward(runner, ids):
    def forward():
        with torch.no_grad():
            return runner(ids, use_cache=False)

    return forward


def profile_variant(models, name: str, batch: int, top: int = 8) -> dict:
    """Profile the dense model and ``name`` eager at ``batch`` and return their top operators."""
    ids = torch.randint(0, VOCAB, (batch, SEQUENCE), generator=torch.Generator().manual_seed(3))
    tables = {}
    for key in ("dense", name):
        with torch.no_grad():
            models[key](ids, use_cache=False)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                models[key](ids, use_cache=False)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        tables[key] = [
            {"op": e.key, "calls": e.count, "self_ms_per_forward": e.self_cpu_time_total / 1000}
            for e in events
        ]
    return tables


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["batch"], r["mode"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), sharey=True)
    for axis, (batch, mode) in zip(axes, panels):
        selected = [r for r in rows if r["batch"] == batch and r["mode"] == mode and r["variant"] != "dense"]
        names = [r["variant"] for r in selected]
        positions = range(len(selected))
        axis.bar([p - 0.2 for p in positions], [r["ideal_speedup"] for r in selected], 0.4, label="ideal (FLOPs)")
        axis.bar([p + 0.2 for p in positions], [r["speedup"] for r in selected], 0.4, label="measured")
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xticks(list(positions), names, rotation=60, ha="right", fontsize=7)
        axis.set_title(f"batch {batch}, {mode}")
    axes[0].set_ylabel("speedup over dense (same mode)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes to measure")
    parser.add_argument("--modes", nargs="+", default=["eager", "inductor"], choices=["eager", "inductor"])
    parser.add_argument("--repeats", type=int, default=4, help="timed calls per variant (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per variant after the first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--profile-below", type=float, default=0.8, help="profile hard variants under this efficiency")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    models = build_models()
    rows = []
    for batch in args.batches:
        rows += measure_batch(models, batch, args.modes, args.warmup, args.repeats)
    profiles = {}
    slow = [r for r in rows if r["mode"] == "eager" and r["hard"] and r["variant"] != "dense"
            and r["efficiency"] < args.profile_below]
    for row in slow:
        key = f"{row['variant']} @ batch {row['batch']}"
        logger.info("profiling %s (efficiency %.2f)", key, row["efficiency"])
        profiles[key] = profile_variant(models, row["variant"], row["batch"])

    write_json("inference.json", {
        "machine": machine(),
        "model": "LlamaModel hidden 1024, intermediate 2816, 8 layers, 16 heads, 4 kv heads, sequence 128",
        "mix": MIX_DESCRIPTION,
        "repeats": args.repeats,
        "rows": rows,
        "profiles": profiles,
    })
    plot(rows, RESULTS / "inference.png")
    print(f"{'batch':>5} {'mode':<8} {'variant':<28} {'params':>11} {'GFLOPs':>7} {'ms':>8} "
          f"{'speedup':>7} {'ideal':>6} {'eff':>5}")
    for r in rows:
        print(f"{r['batch']:>5} {r['mode']:<8} {r['variant']:<28} {r['params']:>11,} {r['gflops']:>7.1f} "
              f"{r['median_ms']:>8.1f} {r['speedup']:>7.2f} {r['ideal_speedup']:>6.2f} {r['efficiency']:>5.2f}")


if __name__ == "__main__":
    main()
