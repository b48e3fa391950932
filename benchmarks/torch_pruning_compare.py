"""surgeon_fx against Torch-Pruning on the same small Llama and the same pruning budget.

Run: ``.venv/bin/python benchmarks/torch_pruning_compare.py [--timeout 300]``
(needs ``pip install torch-pruning==1.6.1``, which ``make bench`` installs).

The model is a ``LlamaForCausalLM`` with random weights (hidden 512, intermediate
1376, 4 layers, 8 heads, 2 key/value heads, vocabulary 4000). Query heads are four
times the key/value heads because Torch-Pruning 1.6.1 skips head pruning without a
warning when they are exactly twice. Two budgets, both by weight magnitude:

- half of the MLP neurons of every layer;
- half of the key/value groups of every layer, with their query heads.

Each run (tool, budget) happens in its own subprocess with a time limit, and a run
that raises or times out is recorded with its error. For each run the script
records the seconds to prune and the parameters left. It also records the median
latency of a forward at batch 1 and sequence 64, as a ratio to the dense model in
the same process, and the mean cosine similarity of the logits to the dense model's.
Last, it checks whether a forward and a greedy ``generate()`` of 8 tokens run. Torch-Pruning is run with the
``MAX_VALID_DIM`` workaround for rotary embeddings, and once per budget without it
to record what happens then.

Writes ``benchmarks/results/torch_pruning_compare.json`` and ``torch_pruning_compare.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
import warnings

import torch

from common import RESULTS, llama_config, machine, time_interleaved, write_json

VOCAB = 4000
SEQUENCE = 64
BUDGETS = {
    "mlp 50%": {"prune": [{"unit": "mlp_neurons", "ratio": 0.5}]},
    "kv groups 50%": {"prune": [{"unit": "heads", "ratio": 0.5, "gqa": "groups"}]},
}
# (tool, budget, workaround)
RUNS = [
    ("surgeon_fx", "mlp 50%", True),
    ("torch-pruning", "mlp 50%", True),
    ("surgeon_fx", "kv groups 50%", True),
    ("torch-pruning", "kv groups 50%", True),
    ("torch-pruning", "mlp 50%", False),
    ("torch-pruning", "kv groups 50%", False),
]


def build_model():
    import transformers

    torch.manual_seed(0)
    config = llama_config(512, 1376, 4, 8, 2, VOCAB)
    return transformers.LlamaForCausalLM(config).eval()


def prune_surgeon_fx(model, budget: str, ids) -> list[str]:
    import surgeon_fx

    surgeon_fx.compress_model(model, BUDGETS[budget], (ids,), {"use_cache": False}, hard=True)
    return []


def prune_torch_pruning(model, budget: str, ids, workaround: bool) -> list[str]:
    """Prune with Torch-Pruning's ``BasePruner`` and return the hand patches it needed."""
    import torch_pruning as tp

    if workaround:
        # Torch-Pruning 1.6.1 reads rotate_half's cat(dim=-1) as a huge unsigned dim, and
        # on some rotary models its dependency group then grows without end. Raising this
        # guard avoids that. The runs without it record whether this model is affected.
        tp.dependency.constants.MAX_VALID_DIM = 2**64
    layers = model.model.layers
    attention = [layer.self_attn for layer in layers]
    mlp = [layer.mlp for layer in layers]
    common = {
        "example_inputs": ids,
        "importance": tp.importance.GroupMagnitudeImportance(p=2),
        # Trace through the logits alone; the default output also contains the key/value cache.
        "forward_fn": lambda module, inputs: module(inputs, use_cache=False).logits,
    }
    if budget == "mlp 50%":
        # Only gate_proj/up_proj outputs may root a group, which leaves the MLP neurons.
        ignored = [model.lm_head] + [m.down_proj for m in mlp]
        ignored += [p for a in attention for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)]
        pruner = tp.pruner.BasePruner(model, pruning_ratio=0.5, ignored_layers=ignored, **common)
    else:
        num_heads = {}
        for a in attention:
            num_heads[a.q_proj] = model.config.num_attention_heads
            num_heads[a.k_proj] = model.config.num_key_value_heads
            num_heads[a.v_proj] = model.config.num_key_value_heads
        ignored = [model.lm_head] + [p for m in mlp for p in (m.gate_proj, m.up_proj, m.down_proj)]
        ignored += [a.o_proj for a in attention]
        pruner = tp.pruner.BasePruner(
            model, pruning_ratio=0.5, ignored_layers=ignored, num_heads=num_heads, prune_num_heads=True,
            prune_head_dims=False, head_pruning_ratio=0.5, **common,
        )
    pruner.step()

    patches = []
    head_dim = model.config.head_dim
    for a in attention:
        q_heads = a.q_proj.out_features // head_dim
        kv_heads = a.k_proj.out_features // head_dim
        if a.num_key_value_groups != q_heads // kv_heads:
            # The attention module keeps its own group count; Torch-Pruning does not update it.
            a.num_key_value_groups = q_heads // kv_heads
            patches.append("self_attn.num_key_value_groups")
    intermediate = {m.up_proj.out_features for m in mlp}
    if len(intermediate) == 1:
        model.config.intermediate_size = intermediate.pop()
    kv = {a.k_proj.out_features // head_dim for a in attention}
    q = {a.q_proj.out_features // head_dim for a in attention}
    if len(kv) == 1 and len(q) == 1 and (kv, q) != ({model.config.num_key_value_heads}, {model.config.num_attention_heads}):
        model.config.num_key_value_heads, model.config.num_attention_heads = kv.pop(), q.pop()
        patches.append("config head counts")
    return sorted(set(patches))


def worker(tool: str, budget: str, workaround: bool) -> dict:
    from surgeon_fx.report import count_params

    warnings.simplefilter("ignore")
    dense = build_model()
    model = copy.deepcopy(dense)
    ids = torch.randint(0, VOCAB, (1, SEQUENCE), generator=torch.Generator().manual_seed(1))
    row = {"tool": tool, "budget": budget, "workaround": workaround, "dense_params": count_params(dense)}

    start = time.perf_counter()
    if tool == "surgeon_fx":
        row["hand_patches"] = prune_surgeon_fx(model, budget, ids)
    else:
        row["hand_patches"] = prune_torch_pruning(model, budget, ids, workaround)
    row["prune_s"] = time.perf_counter() - start
    row["params"] = count_params(model)
    row["kept"] = row["params"] / row["dense_params"]
    row["layer0"] = {name: tuple(p.shape) for name, p in model.model.layers[0].named_parameters()
                     if name.endswith("weight") and p.dim() == 2}

    try:
        with torch.no_grad():
            reference = dense(ids, use_cache=False).logits
            logits = model(ids, use_cache=False).logits
        row["forward"] = "ok"
        row["cosine_vs_dense"] = float(torch.nn.functional.cosine_similarity(logits, reference, dim=-1).mean())
    except Exception as error:  # recorded, not hidden: a pruned model that cannot run is a result
        row["forward"] = f"{type(error).__name__}: {error}"[:300]
        return row

    forwards = {
        "dense": lambda: dense(ids, use_cache=False),
        "pruned": lambda: model(ids, use_cache=False),
    }
    with torch.no_grad():
        medians = time_interleaved(forwards, warmup=2, repeats=15)
    row["latency_ratio"] = medians["pruned"] / medians["dense"]
    row["dense_ms"] = medians["dense"] * 1000

    try:
        with torch.no_grad():
            out = model.generate(ids[:, :8], max_new_tokens=8, do_sample=False, pad_token_id=0)
        row["generate"] = f"ok ({out.shape[1] - 8} new tokens)"
    except Exception as error:  # recorded, not hidden
        row["generate"] = f"{type(error).__name__}: {error}"[:300]
    return row


def run(tool: str, budget: str, workaround: bool, timeout: float, threads: int | None) -> dict:
    command = [sys.executable, __file__, "--worker", tool, budget, str(int(workaround))]
    if threads:
        command += ["--threads", str(threads)]
    base = {"tool": tool, "budget": budget, "workaround": workaround}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"did not finish within {timeout:.0f} s"}
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return {**base, "error": f"exit {done.returncode}: {tail}"[:400]}
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["subprocess_s"] = time.perf_counter() - start
    return row


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "error" not in r and r.get("forward") == "ok" and r["workaround"]]
    labels = [f"{r['tool']}\n{r['budget']}" for r in done]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for axis, key, title in ((axes[0], "prune_s", "seconds to prune"),
                             (axes[1], "latency_ratio", "latency / dense"),
                             (axes[2], "cosine_vs_dense", "logit cosine vs dense")):
        axis.bar(range(len(done)), [r[key] for r in done], color=["C0" if r["tool"] == "surgeon_fx" else "C1" for r in done])
        axis.set_xticks(range(len(done)), labels, fontsize=7)
        axis.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed per run")
    parser.add_argument("--hang-timeout", type=float, default=90,
                        help="seconds allowed for the run without the workaround, which is expected to hang")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        tool, budget, workaround = args.worker
        print(json.dumps(worker(tool, budget, workaround == "1")))
        return

    rows = []
    for tool, budget, workaround in RUNS:
        timeout = args.timeout if workaround else args.hang_timeout
        row = run(tool, budget, workaround, timeout, args.threads)
        rows.append(row)
        status = row.get("error") or (f"{row['prune_s']:.2f} s, {row['kept']:.1%} params, latency "
                                      f"{row.get('latency_ratio', float('nan')):.2f}x, cosine "
                                      f"{row.get('cosine_vs_dense', float('nan')):.3f}, forward {row['forward']}, "
                                      f"generate {row.get('generate')}")
        print(f"{tool:<14} {budget:<14} workaround={workaround}: {status}", flush=True)
    write_json("torch_pruning_compare.json", {"machine": machine(), "rows": rows})
    plot(rows, RESULTS / "torch_pruning_compare.png")


if __name__ == "__main__":
    main()
