"""Forward latency of dense and compressed Llama, eager and inductor, in one run.

The model is a Llama with random weights from ``LlamaConfig`` (hidden 1024,
intermediate 2816, 8 layers, 16 heads, 4 key/value heads), run at batch 1 and
sequence 128 under ``torch.no_grad``. Four variants:

- dense eager: the model as is;
- dense inductor: ``torch.compile(model)``;
- compressed eager: ``torch.compile(model, backend=surgeon_fx.backend(plan, inner="eager"))``;
- compressed inductor: the same with ``inner="inductor"``.

The plan decomposes every attention and MLP linear to keep half of its weights.
Each variant is compiled and warmed up, then the variants are timed in turn over
several rounds. The median is reported, with its ratio to dense eager.

Run: ``.venv/bin/python benchmarks/compile_backend.py [--repeats 20] [--threads N]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

import torch
import transformers

import surgeon_fx

PLAN_RANK = surgeon_fx.Keep(0.5)
PLAN = {
    "lrd": [
        {"roles": ["q", "k", "v", "attn_out", "mlp_gate", "mlp_up", "mlp_down"], "rank": {"keep": PLAN_RANK.fraction}},
    ]
}


def build_model() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
    )
    torch.manual_seed(0)
    return transformers.LlamaModel(config).eval()


def measure(forwards: dict, inputs: torch.Tensor, warmup: int, repeats: int) -> dict:
    """Return, per variant, (seconds of the first call, median seconds per call, output).

    Every variant is compiled and warmed up first. The timed calls then go round the
    variants in turn, so that load from other processes affects them alike.
    """
    results = {}
    times: dict[str, list[float]] = {name: [] for name in forwards}
    with torch.no_grad():
        for name, forward in forwards.items():
            print(f"compiling {name} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            output = forward(inputs).last_hidden_state
            results[name] = [time.perf_counter() - start, None, output]
            for _ in range(warmup):
                forward(inputs)
        for _ in range(repeats):
            for name, forward in forwards.items():
                start = time.perf_counter()
                forward(inputs)
                times[name].append(time.perf_counter() - start)
    for name, result in results.items():
        result[1] = statistics.median(times[name])
    return {name: tuple(result) for name, result in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed forward passes per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forward passes after the first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    model = build_model()
    inputs = torch.randint(0, 32000, (1, 128), generator=torch.Generator().manual_seed(1))
    dense_params = sum(p.numel() for p in model.parameters())

    compiler = surgeon_fx.backend(PLAN, inner="inductor", model=model)
    # Each torch.compile wrapper keeps its own Dynamo cache entry, told apart by backend.
    forwards = {
        "dense eager": model,
        "dense inductor": torch.compile(model),
        "compressed eager": torch.compile(model, backend=surgeon_fx.backend(PLAN, inner="eager", model=model)),
        "compressed inductor": torch.compile(model, backend=compiler),
    }
    variants = measure(forwards, inputs, args.warmup, args.repeats)

    sites = sorted({path for report in compiler.reports for path in report.sites})
    added = sum(report.seconds for report in compiler.reports)
    compressed_params = _compressed_param_count(model, compiler)
    baseline = variants["dense eager"][1]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input (1, 128)")
    print(f"compressed {len(sites)} linear sites; parameters {dense_params:,} -> {compressed_params:,}")
    print(f"time added by surgeon_fx to compilation: {added:.2f} s")
    # Each variant is checked against its eager counterpart, dense or compressed.
    print(f"{'variant':<20} {'first call s':>12} {'median ms':>10} {'vs dense eager':>15} {'max |diff|':>11}")
    for name, (first, median, output) in variants.items():
        reference = variants[name.replace("inductor", "eager")][2]
        diff = (output - reference).abs().max().item()
        print(f"{name:<20} {first:>12.2f} {median * 1000:>10.2f} {median / baseline:>14.2f}x {diff:>11.3g}")


def _compressed_param_count(model: torch.nn.Module, compiler: surgeon_fx.CompressionBackend) -> int:
    total = sum(p.numel() for p in model.parameters())
    names = {name.removesuffix(".weight"): p for name, p in model.named_parameters()}
    for path in {path for report in compiler.reports for path in report.sites}:
        weight = names[path]
        out_features, in_features = weight.shape
        rank = PLAN_RANK.rank_for(out_features, in_features)
        total += rank * (in_features + out_features) - weight.numel()
    return total


if __name__ == "__main__":
    main()
