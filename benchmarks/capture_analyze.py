"""Time capture and analysis of Llama-shaped models against depth.

Run: ``.venv/bin/python benchmarks/capture_analyze.py [--json PATH]``.

Models have hidden size 256, 4 heads, 2 key/value heads, intermediate size 688
and random weights. Analysis time should grow linearly with depth: the last
column divides each time by the time at 4 layers and by the depth ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
import transformers

import surgeon_fx

DEPTHS = (4, 8, 16, 32)


def llama(layers: int) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000,
    )
    return transformers.LlamaForCausalLM(config).eval()


def measure(layers: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = llama(layers)
    ids = torch.randint(0, 1000, (2, 16))
    start = time.perf_counter()
    gm = surgeon_fx.capture(model, (ids,))
    capture_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        analysis = surgeon_fx.analyze(gm)
        times.append(time.perf_counter() - start)
    return {
        "layers": layers,
        "nodes": len(gm.graph.nodes),
        "sites": len(analysis.sites),
        "capture_s": capture_s,
        "analyze_s": statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="analysis repetitions per depth (median)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = [measure(layers, args.repeats) for layers in DEPTHS]
    base = rows[0]
    print(f"{'layers':>6} {'nodes':>6} {'sites':>6} {'capture s':>10} {'analyze ms':>11} {'per-layer ratio':>16}")
    for row in rows:
        # 1.0 means analysis time per layer is the same as at the smallest depth.
        ratio = (row["analyze_s"] / base["analyze_s"]) / (row["layers"] / base["layers"])
        row["per_layer_ratio"] = ratio
        print(f"{row['layers']:>6} {row['nodes']:>6} {row['sites']:>6} {row['capture_s']:>10.2f} "
              f"{row['analyze_s'] * 1000:>11.1f} {ratio:>16.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
