"""Cost of compression: time and peak memory of capture, analysis and hard compression.

Run: ``.venv/bin/python benchmarks/compression_cost.py [--timeout 300] [--threads 1]``.

Each configuration runs in a fresh subprocess, so that ``resource.getrusage``'s
maximum resident set size (which counts torch's CPU allocations, unlike
``tracemalloc``) belongs to that configuration alone. A worker builds a Llama with
random weights, then times ``surgeon_fx.capture``, ``surgeon_fx.analyze`` and
``surgeon_fx.compress(gm, plan, hard=True)`` with a plan that decomposes every
attention and MLP linear to half its weights. Peak memory is reported as the peak
resident set size minus the resident set size before the model was built, and as a
multiple of the model's parameter bytes.

Two sweeps: depth 4, 8, 16 and 32 at hidden 256, and hidden 256 to 2048 at 4
layers (intermediate size about 2.7 times hidden, head size 64, half as many
key/value heads as query heads). A third part compares the SVD step:
``torch.linalg.svd`` (what surgeon_fx uses) against ``torch.svd_lowrank`` for small
ranks, on a random-init weight (flat spectrum) and on a weight with a decaying
spectrum, with the relative Frobenius error each gives.

Writes ``benchmarks/results/compression_cost.json`` and ``compression_cost.png``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings

import torch

from common import RESULTS, llama_config, machine, write_json

DEPTHS = (4, 8, 16, 32)
WIDTHS = (256, 512, 1024, 2048)
PLAN = {"lrd": [{"roles": ["q", "k", "v", "attn_out", "mlp_gate", "mlp_up", "mlp_down"], "rank": {"keep": 0.5}}]}
SVD_SHAPE = (2816, 1024)  # an MLP up projection of the inference benchmark's model
SVD_RANKS = (16, 64, 128)


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(layers: int, hidden: int) -> dict:
    """Measure one configuration in this process; the parent runs it in a fresh one."""
    import transformers

    import surgeon_fx
    from surgeon_fx.report import count_params

    warnings.simplefilter("ignore")
    heads = hidden // 64
    intermediate = int(round(hidden * 2.6875 / 16)) * 16
    base_rss = _rss_mib()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(
        llama_config(hidden, intermediate, layers, heads, max(1, heads // 2), 1000)
    ).eval()
    params = count_params(model)
    model_mib = params * 4 / 2**20
    ids = torch.randint(0, 1000, (2, 16))
    row = {"layers": layers, "hidden": hidden, "intermediate": intermediate, "params": params,
           "model_mib": model_mib}

    start, cpu = time.perf_counter(), _cpu_s()
    gm = surgeon_fx.capture(model, (ids,), {"use_cache": False})
    row["capture_s"] = time.perf_counter() - start
    row["capture_cpu_s"] = _cpu_s() - cpu
    row["peak_after_capture_mib"] = _peak_mib() - base_rss
    del model  # only the graph module references the parameters now

    start, cpu = time.perf_counter(), _cpu_s()
    analysis = surgeon_fx.analyze(gm)
    row["analyze_s"] = time.perf_counter() - start
    row["analyze_cpu_s"] = _cpu_s() - cpu
    row["sites"] = len(analysis.sites)
    row["nodes"] = len(gm.graph.nodes)

    start, cpu = time.perf_counter(), _cpu_s()
    surgeon_fx.compress(gm, PLAN, hard=True)
    row["compress_s"] = time.perf_counter() - start
    row["compress_cpu_s"] = _cpu_s() - cpu
    row["params_after"] = count_params(gm)
    row["peak_mib"] = _peak_mib() - base_rss
    row["peak_over_model"] = row["peak_mib"] / model_mib
    return row


def run_sweep(configs: list[tuple[int, int]], timeout: float, threads: int | None) -> list[dict]:
    rows = []
    for layers, hidden in configs:
        command = [sys.executable, __file__, "--worker", str(layers), str(hidden)]
        if threads:
            command += ["--threads", str(threads)]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            rows.append({"layers": layers, "hidden": hidden, "error": f"timed out after {timeout:.0f} s"})
            continue
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-3:]
            rows.append({"layers": layers, "hidden": hidden, "error": f"exit {done.returncode}: {' | '.join(tail)}"})
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["subprocess_s"] = time.perf_counter() - start
        rows.append(row)
        print(f"layers {layers:>2} hidden {hidden:>4}: capture {row['capture_s']:.1f} s, analyze "
              f"{row['analyze_s']:.2f} s, compress {row['compress_s']:.1f} s, peak "
              f"{row['peak_mib']:.0f} MiB = {row['peak_over_model']:.2f}x model", flush=True)
    return rows


def compare_svd(repeats: int) -> list[dict]:
    """Time full SVD against ``svd_lowrank`` per rank, with the error of each rank-r approximation."""
    torch.manual_seed(0)
    out_features, in_features = SVD_SHAPE
    random_init = torch.nn.Linear(in_features, out_features).weight.detach()
    # A spectrum falling as 1/sqrt(i), closer to trained weights than a random init.
    left, _ = torch.linalg.qr(torch.randn(out_features, in_features))
    right, _ = torch.linalg.qr(torch.randn(in_features, in_features))
    decaying = left @ torch.diag(torch.arange(1, in_features + 1).float() ** -0.5) @ right.T
    rows = []
    for label, weight in (("random init", random_init), ("decaying spectrum", decaying)):
        norm = torch.linalg.matrix_norm(weight)
        full_s = _median_time(lambda: torch.linalg.svd(weight, full_matrices=False), repeats)
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        for rank in SVD_RANKS:
            exact = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
            lowrank_s = _median_time(lambda: torch.svd_lowrank(weight, q=rank + 10, niter=2), repeats)
            lu, ls, lv = torch.svd_lowrank(weight, q=rank + 10, niter=2)
            approx = lu[:, :rank] @ torch.diag(ls[:rank]) @ lv[:, :rank].T
            rows.append({
                "weight": label,
                "shape": list(SVD_SHAPE),
                "rank": rank,
                "linalg_svd_s": full_s,
                "svd_lowrank_s": lowrank_s,
                "linalg_svd_error": float(torch.linalg.matrix_norm(weight - exact) / norm),
                "svd_lowrank_error": float(torch.linalg.matrix_norm(weight - approx) / norm),
            })
    return rows


def _median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def plot(depth_rows: list[dict], width_rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for axis, rows, key, label in ((axes[0], depth_rows, "layers", "layers (hidden 256)"),
                                   (axes[1], width_rows, "hidden", "hidden size (4 layers)")):
        rows = [r for r in rows if "error" not in r]
        xs = [r[key] for r in rows]
        for stage in ("capture_s", "analyze_s", "compress_s"):
            axis.plot(xs, [r[stage] for r in rows], marker="o", label=stage.removesuffix("_s"))
        axis.set_xscale("log", base=2)
        axis.set_xlabel(label)
        axis.set_ylabel("seconds")
        axis.legend(fontsize=8)
    rows = [r for r in depth_rows + width_rows if "error" not in r]
    axes[2].scatter([r["model_mib"] for r in rows], [r["peak_over_model"] for r in rows])
    axes[2].set_xscale("log")
    axes[2].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[2].set_xlabel("model size (MiB, float32)")
    axes[2].set_ylabel("peak RSS increase / model size")
    axes[2].set_title("hard LRD, capture to compress")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, type=int, metavar=("LAYERS", "HIDDEN"), help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed per configuration")
    parser.add_argument("--svd-repeats", type=int, default=3, help="timed SVD calls per rank (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return

    depth_rows = run_sweep([(layers, 256) for layers in DEPTHS], args.timeout, args.threads)
    width_rows = run_sweep([(4, hidden) for hidden in WIDTHS], args.timeout, args.threads)
    svd_rows = compare_svd(args.svd_repeats)
    for row in svd_rows:
        print(f"{row['weight']:<18} rank {row['rank']:>3}: linalg.svd {row['linalg_svd_s']:.2f} s error "
              f"{row['linalg_svd_error']:.4f}; svd_lowrank {row['svd_lowrank_s']:.3f} s error "
              f"{row['svd_lowrank_error']:.4f}")
    write_json("compression_cost.json", {
        "machine": machine(),
        "plan": PLAN,
        "threads": torch.get_num_threads(),
        "depth": depth_rows,
        "width": width_rows,
        "svd": svd_rows,
    })
    plot(depth_rows, width_rows, RESULTS / "compression_cost.png")


if __name__ == "__main__":
    main()
