"""Fidelity of compressed all-MiniLM-L6-v2 against the original, by method and size.

Run: ``.venv/bin/python benchmarks/fidelity.py`` (about 10 minutes on 2 cores).

Calibration uses sentences 0-255 of CPython's pydoc topics and evaluation uses
sentences 256-511, so the two sets are disjoint. For each method and each size
(the fraction of the compressed layers' weights that is kept), the script reports:

- mean cosine similarity of mean-pooled sentence embeddings against the original;
- nearest-neighbour agreement: the fraction of evaluation sentences whose nearest
  other sentence is the same under the compressed and the original model.

It writes ``benchmarks/results/fidelity.json``, ``benchmarks/results/fidelity.png``
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import surgeon_fx
from surgeon_fx.calibration import calibrate
from surgeon_fx.demo import embed, load_minilm, tokenize
from surgeon_fx.data import pydoc_sentences
from surgeon_fx.report import count_params

RESULTS = Path(__file__).parent / "results"
ROLES = ["q", "k", "v", "attn_out", "mlp_up", "mlp_down"]
SIZES = (0.8, 0.6, 0.5)


def lrd_plans(keep: float) -> dict[str, dict]:
    uniform = {"roles": ROLES, "rank": {"keep": keep}}
    budget = {"roles": ROLES, "budget": {"params": keep}, "method": "svd-llm"}
    return {
        "svd uniform": {"lrd": [uniform]},
        "svd-llm uniform": {"lrd": [{**uniform, "method": "svd-llm"}]},
        "svd-llm budget": {"lrd": [budget]},
        "svd-llm sequential budget": {"sequential": True, "lrd": [budget]},
    }


def prune_plans(keep: float) -> dict[str, dict]:
    ratio = round(1 - keep, 4)
    return {
        f"{criterion} pruning": {
            "prune": [
                {"unit": "mlp_neurons", "ratio": ratio, "criterion": criterion},
                {"unit": "heads", "ratio": ratio, "criterion": criterion},
            ]
        }
        for criterion in ("magnitude", "activation")
    }


def neighbour_agreement(reference: torch.Tensor, compressed: torch.Tensor) -> float:
    def nearest(embeddings: torch.Tensor) -> torch.Tensor:
        similarity = embeddings @ embeddings.T
        similarity.fill_diagonal_(-2.0)
        return similarity.argmax(1)

    return float((nearest(reference) == nearest(compressed)).float().mean())


def kept_fraction(gm, selected_params: int, dense_total: int) -> float:
    """Return the fraction of the selected layers' weights left after compression."""
    removed = dense_total - count_params(gm)
    return (selected_params - removed) / selected_params


def run(args) -> list[dict]:
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    calibration = tokenize(tokenizer, pydoc_sentences(args.sentences), 32)
    evaluation = tokenize(tokenizer, pydoc_sentences(args.sentences, offset=args.sentences), 32)
    gm = surgeon_fx.capture(model, kwargs=calibration[0])
    analysis = surgeon_fx.analyze(gm)
    selected = analysis.sites_with_role(*ROLES)
    selected_params = sum(s.num_params for s in selected)
    dense_total = count_params(gm)
    stats = calibrate(gm, calibration, selected)
    reference = embed(gm, evaluation)

    rows = []
    for keep in SIZES:
        plans = lrd_plans(keep)
        if args.prune:
            plans.update(prune_plans(keep))
        for name, plan in plans.items():
            start = time.perf_counter()
            sequential = plan.get("sequential", False)
            uses_stats = "svd-llm" in name or "activation" in name
            if sequential:
                kwargs = {"calibration": calibration}
            elif uses_stats:
                kwargs = {"stats": stats}
            else:
                kwargs = {}
            surgeon_fx.compress(gm, plan, hard=False, **kwargs)
            compressed = embed(gm, evaluation)
            row = {
                "method": name,
                "target_keep": keep,
                "kept": kept_fraction(gm, selected_params, dense_total),
                "cosine": float((reference * compressed).sum(-1).mean()),
                "neighbours": neighbour_agreement(reference, compressed),
                "seconds": time.perf_counter() - start,
            }
            surgeon_fx.restore(gm)
            rows.append(row)
            print(f"{name:<28} keep {keep:.0%}: kept {row['kept']:.3f}, cosine {row['cosine']:.4f}, "
                  f"neighbours {row['neighbours']:.3f} ({row['seconds']:.0f} s)", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| method | target kept | kept | mean cosine | NN agreement |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(f"| {row['method']} | {row['target_keep']:.0%} | {row['kept']:.3f} | "
                     f"{row['cosine']:.4f} | {row['neighbours']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["kept"], r["cosine"]) for r in rows if r["method"] == method)
        axis.plot(*zip(*points), marker="o", label=method)
    axis.set_xlabel("fraction of compressed layers' weights kept")
    axis.set_ylabel("mean embedding cosine vs original")
    axis.set_title("all-MiniLM-L6-v2, 256 evaluation sentences")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=256, help="sentences per set (default 256)")
    parser.add_argument("--no-prune", dest="prune", action="store_false", help="skip the pruning rows")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    rows = run(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fidelity.json").write_text(json.dumps(rows, indent=2))
    plot(rows, RESULTS / "fidelity.png")
    print()
    print(markdown(rows))


if __name__ == "__main__":
    main()
