"""Run every benchmark and write ``benchmarks/README.md`` from their JSON results.

Run: ``make bench``, or ``.venv/bin/python benchmarks/run_all.py [--fidelity] [--compile-backend]``.

Each benchmark runs as its own subprocess and writes its JSON and PNG under
``benchmarks/results/``. The MiniLM fidelity benchmark (about 10 minutes on 2
cores) and the ``torch.compile`` backend benchmark run only when requested. Without
``--fidelity`` the page reports the fidelity JSON already in ``benchmarks/results/``.
``--report-only`` rebuilds the page from the JSON files without running anything.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
ANALYSIS = HERE / "analysis.md"


def run(script: str, *arguments: str) -> dict:
    """Run one benchmark script and return its wall time and exit status."""
    command = [sys.executable, str(HERE / script), *arguments]
    print(f"== {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=HERE)
    seconds = time.perf_counter() - start
    print(f"== {script} finished in {seconds:.0f} s with exit status {done.returncode}", flush=True)
    return {"script": script, "arguments": list(arguments), "seconds": seconds, "returncode": done.returncode}


def load(name: str):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_section(runs: list[dict]) -> str:
    info = next((data["machine"] for name in ("inference.json", "compression_cost.json", "torch_pruning_compare.json")
                 if (data := load(name))), None)
    if info is None:
        return "No results yet: run `make bench`."
    text = (
        f"Measured on {info['cpu']}, {info['cores']} cores (torch threads: {info['torch_threads']}), "
        f"torch {info['torch']}, transformers {info['transformers']}, Python {info['python']}. "
        "The machine was shared with other processes (tests and other benchmarks) while these "
        "figures were taken, so absolute times are noisy and longer than on an idle machine. "
        "Every speedup is a ratio of medians taken in one process, with the timed calls of the "
        "variants interleaved, so load affects a variant and its baseline alike."
    )
    if runs:
        total = sum(r["seconds"] for r in runs)
        steps = ", ".join(f"{r['script']} {r['seconds']:.0f} s" for r in runs)
        text += f"\n\nLast `make bench`: {total / 60:.1f} minutes ({steps})."
    return text


def inference_section() -> str:
    data = load("inference.json")
    if data is None:
        return "Not run."
    parts = [
        f"{data['model']}, random weights, {data['repeats']} timed calls per variant (median). "
        f"Mix: {data['mix']}. Speedup is against the dense model in the same mode; ideal is "
        "dense FLOPs over variant FLOPs (FlopCounterMode: matrix multiplications and attention); "
        "efficiency is speedup over ideal. Cosine compares the last hidden state with the dense "
        "model's (random weights, so it shows the size of the change, not quality).",
        "",
        "![inference](results/inference.png)",
        "",
    ]
    rows = [
        [r["batch"], r["mode"], r["variant"], f"{r['params'] / 1e6:.1f}M", f"{r['gflops']:.1f}",
         f"{r['median_ms']:.0f}", f"{r['speedup']:.2f}", f"{r['ideal_speedup']:.2f}", f"{r['efficiency']:.2f}",
         f"{r['cosine_vs_dense']:.3f}"]
        for r in data["rows"]
    ]
    parts.append(table(["batch", "mode", "variant", "params", "GFLOPs", "median ms", "speedup", "ideal",
                        "efficiency", "cosine"], rows))
    for key, tables in data.get("profiles", {}).items():
        parts += ["", f"Profile of {key} (eager, top operators by self CPU time per forward):", ""]
        names = list(tables)
        rows = []
        for index in range(max(len(t) for t in tables.values())):
            row = []
            for name in names:
                entry = tables[name][index] if index < len(tables[name]) else None
                row += [f"`{entry['op']}`", entry["calls"], f"{entry['self_ms_per_forward']:.1f}"] if entry else ["", "", ""]
            rows.append(row)
        headers = [f"{name} {column}" for name in names for column in ("op", "calls", "ms")]
        parts.append(table(headers, rows))
    return "\n".join(parts)


def cost_section() -> str:
    data = load("compression_cost.json")
    if data is None:
        return "Not run."
    parts = [
        "Hard LRD of every attention and MLP linear to 50% of its weights, each configuration "
        "in a fresh subprocess. CPU seconds count the process's own user and system time, "
        "which load from other processes inflates less than wall time does. Peak is the "
        "increase of the maximum resident set size over the size before the model was built.",
        "",
        "![compression cost](results/compression_cost.png)",
        "",
    ]
    headers = ["layers", "hidden", "params", "sites", "capture s (cpu)", "analyze s (cpu)",
               "compress s (cpu)", "peak MiB", "peak / model"]
    rows = []
    for r in data["depth"] + data["width"]:
        if "error" in r:
            rows.append([r["layers"], r["hidden"], r["error"], "", "", "", "", "", ""])
            continue
        rows.append([
            r["layers"], r["hidden"], f"{r['params'] / 1e6:.1f}M", r["sites"],
            f"{r['capture_s']:.1f} ({r['capture_cpu_s']:.1f})", f"{r['analyze_s']:.2f} ({r['analyze_cpu_s']:.2f})",
            f"{r['compress_s']:.1f} ({r['compress_cpu_s']:.1f})", f"{r['peak_mib']:.0f}", f"{r['peak_over_model']:.2f}x",
        ])
    parts.append(table(headers, rows))
    parts += ["", "SVD of one weight: `torch.linalg.svd` (full, then truncated) against "
              "`torch.svd_lowrank(q=rank + 10, niter=2)`; error is the relative Frobenius error "
              "of the rank-r approximation.", ""]
    rows = [[r["weight"], "x".join(map(str, r["shape"])), r["rank"], f"{r['linalg_svd_s']:.2f}",
             f"{r['svd_lowrank_s']:.3f}", f"{r['linalg_svd_error']:.4f}", f"{r['svd_lowrank_error']:.4f}"]
            for r in data["svd"]]
    parts.append(table(["weight", "shape", "rank", "linalg.svd s", "svd_lowrank s", "linalg.svd error",
                        "svd_lowrank error"], rows))
    return "\n".join(parts)


def torch_pruning_section() -> str:
    data = load("torch_pruning_compare.json")
    if data is None:
        return "Not run."
    parts = [
        "LlamaForCausalLM with random weights (hidden 512, intermediate 1376, 4 layers, 8 heads, "
        "2 key/value heads), magnitude criterion, batch 1, sequence 64. Latency is the pruned "
        "model's median over the dense model's, in one process. Cosine compares logits with the "
        "dense model's. Torch-Pruning 1.6.1 runs with `MAX_VALID_DIM = 2**64` unless the "
        "workaround column says no. Latency differences of a few hundredths between runs with "
        "the same shapes are noise from the shared machine.",
        "",
        "![torch-pruning](results/torch_pruning_compare.png)",
        "",
    ]
    rows = []
    for r in data["rows"]:
        if "error" in r:
            rows.append([r["tool"], r["budget"], "yes" if r["workaround"] else "no", "", "", "", "", r["error"], "", ""])
            continue
        layer = r["layer0"]
        shapes = f"q {layer['self_attn.q_proj.weight'][0]}, k {layer['self_attn.k_proj.weight'][0]}, " \
                 f"up {layer['mlp.up_proj.weight'][0]}"
        rows.append([
            r["tool"], r["budget"], "yes" if r["workaround"] else "no", f"{r['prune_s']:.2f}",
            f"{r['kept']:.1%}", shapes, f"{r.get('latency_ratio', float('nan')):.2f}", r["forward"],
            f"{r['cosine_vs_dense']:.3f}" if "cosine_vs_dense" in r else "", r.get("generate", ""),
        ])
    parts.append(table(["tool", "budget", "workaround", "prune s", "params kept", "layer 0 out features",
                        "latency", "forward", "cosine", "generate"], rows))
    patched = {f"{r['tool']} {r['budget']}": ", ".join(r["hand_patches"]) for r in data["rows"] if r.get("hand_patches")}
    if patched:
        parts += ["", "Attributes the script had to patch by hand after pruning: " + "; ".join(
            f"{run} ({attributes})" for run, attributes in patched.items()) + "."]
    return "\n".join(parts)


def fidelity_section() -> str:
    data = load("fidelity.json")
    if data is None:
        return "Not run."
    rows = [[r["method"], r["target_keep"], f"{r['kept']:.3f}", f"{r['cosine']:.3f}", f"{r['neighbours']:.3f}",
             f"{r['seconds']:.0f}"] for r in data]
    return "\n".join([
        "all-MiniLM-L6-v2 with real weights, real English text from CPython's pydoc topics "
        "(calibration and evaluation sentences disjoint), from `benchmarks/fidelity.py` "
        "(`results/fidelity.json`; `run_all.py --fidelity` runs it again).",
        "",
        "![fidelity](results/fidelity.png)",
        "",
        table(["method", "target keep", "kept", "embedding cosine", "neighbour agreement", "seconds"], rows),
    ])


def multimodal_section() -> str:
    data = load("multimodal_hidden.json")
    if data is None:
        return "Not run."
    seconds, share = data["seconds"], data["fraction_of_capture"]
    rows = [[step, f"{seconds[key]:.2f}", f"{share[key]:.2f}" if key in share else "1.00"]
            for step, key in (("capture and analysis", "capture_and_analysis"), ("hidden-size join", "join"),
                              ("soft compression", "soft"), ("hard compression", "hard"))]
    params = data["params"]
    return "\n".join([
        f"A Qwen2.5-VL built from a config (vision width 256, text width 512, 4 blocks each) runs one image of "
        f"{data['patches']} patches and {data['tokens']} tokens, from `benchmarks/multimodal_hidden.py`. The plan "
        "is the quick start's per-tower head and neuron pruning with 10% of each tower's hidden size.",
        "",
        f"- restore bit-exact: {data['restore_bit_exact']}",
        f"- largest |hard - soft| logit difference: {data['max_abs_hard_minus_soft']:.1e}",
        f"- parameters: {params['before']:,} -> {params['after']:,}",
        f"- hidden sizes: {data['hidden_sizes']['vision']} (vision) and {data['hidden_sizes']['text']} (text)",
        "",
        table(["step", "seconds", "share of capture"], rows),
    ])


def write_readme(runs: list[dict]) -> None:
    analysis = ANALYSIS.read_text().strip() if ANALYSIS.exists() else ""
    sections = [
        "# Benchmarks",
        "`make bench` runs these and rewrites this page; `benchmarks/run_all.py --help` lists the "
        "options. Raw figures are in `results/*.json`.",
        "## Machine",
        machine_section(runs),
        "## Inference: measured against ideal speedup",
        inference_section(),
    ]
    if analysis:
        sections += ["## Findings", analysis]
    sections += [
        "## Cost of compression",
        cost_section(),
        "## Against Torch-Pruning",
        torch_pruning_section(),
        "## Fidelity on MiniLM",
        fidelity_section(),
        "## Hidden-size pruning of a multimodal model",
        multimodal_section(),
    ]
    (HERE / "README.md").write_text("\n\n".join(sections) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fidelity", action="store_true", help="also rerun benchmarks/fidelity.py (about 10 min)")
    parser.add_argument("--compile-backend", action="store_true", help="also run benchmarks/compile_backend.py")
    parser.add_argument("--report-only", action="store_true", help="only rebuild README.md from results/*.json")
    parser.add_argument("--threads", default="1", help="torch CPU threads of every benchmark")
    args = parser.parse_args()

    runs: list[dict] = []
    if not args.report_only:
        # Profile from 90% down, so that the weakest variants are explained before they reach 80%.
        runs.append(run("inference.py", "--threads", args.threads, "--profile-below", "0.9"))
        runs.append(run("compression_cost.py", "--threads", args.threads))
        runs.append(run("torch_pruning_compare.py", "--threads", args.threads))
        runs.append(run("multimodal_hidden.py"))
        if args.fidelity:
            runs.append(run("fidelity.py"))
        if args.compile_backend:
            runs.append(run("compile_backend.py", "--threads", args.threads))
        (RESULTS / "run_all.json").write_text(json.dumps(runs, indent=2))
    elif (RESULTS / "run_all.json").exists():
        runs = json.loads((RESULTS / "run_all.json").read_text())
    write_readme(runs)
    print(f"wrote {HERE / 'README.md'}")
    failed = [r["script"] for r in runs if r["returncode"] != 0]
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
