"""Invariants that every compression of every model must keep, checked one model at a time.

:func:`check_invariants` captures a model once and runs each check on a private
copy of the captured graph module, so neither the model nor the capture changes.
A broken invariant raises :class:`InvariantError` (an ``AssertionError``) whose
message starts with the invariant's name and names the site or tensor involved.

Invariants, by name:

- ``roles``: every attention op has its query, key, value and output projections,
  their head geometry adds up, and every linear site inside a repeated block has
  an attention or MLP role.
- ``lint``: ``graph.lint()`` passes on the graph after every pass and after restore.
- ``full_rank``: decomposing every attention and MLP site to rank ``"full"`` leaves
  every output bit for bit equal.
- ``restore``: soft compression followed by ``restore`` gives back ``gm.code`` and
  every parameter and buffer bit for bit, under the same names.
- ``hard_soft``: hard and soft compression compute the same outputs within
  ``atol``/``rtol``; where soft pruning keeps the hidden size, its removed channels
  are exactly zero.
- ``other_sizes``: hard and soft compression also agree on inputs one row longer in
  the batch dimension and, for integer inputs such as token ids, two positions
  longer in the sequence dimension, whenever the uncompressed graph runs on them.
- ``param_count``: the hard-compressed parameter count equals the count that
  :mod:`surgeon_fx.testing.predict` computes from the plan and the site shapes.
- ``invalid_plan``: an invalid plan raises ``PlanError`` and leaves the graph
  module bit for bit unchanged.
- ``deterministic``: the same plan (with the same seeds) gives the same code and
  tensors twice.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from ..analysis import Analysis, analyze
from ..api import compress, restore
from ..capture import capture
from ..errors import PlanError
from ..passes.manager import journal_of
from ..plan import CALIBRATED_METHODS, Plan
from .predict import hidden_kept, predict_num_params, selects

INVARIANTS = (
    "roles", "lint", "full_rank", "restore", "hard_soft", "other_sizes", "param_count", "invalid_plan", "deterministic",
)
ATTENTION_AND_MLP_ROLES = ("q", "k", "v", "qkv", "attn_out", "mlp_up", "mlp_gate", "mlp_gate_up", "mlp_down")


class InvariantError(AssertionError):
    """An invariant does not hold; the message names the invariant and the site."""

    def __init__(self, invariant: str, message: str) -> None:
        super().__init__(f"invariant {invariant!r} broken: {message}")
        self.invariant = invariant


def check_invariants(
    model: nn.Module,
    args: Any = (),
    kwargs: dict | None = None,
    plan: Plan | dict | None = None,
    *,
    skip: Iterable[str] = (),
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> None:
    """Check every invariant of compression on ``model`` with ``plan``.

    ``model`` is an ``nn.Module`` (captured here with :func:`surgeon_fx.capture` on
    ``args`` and ``kwargs``) or a graph module that :func:`surgeon_fx.capture`
    returned. Neither changes. Without a ``plan``, the plan of
    :func:`default_plan` is used. ``skip`` names invariants to leave out (see
    :data:`INVARIANTS`), for example ``"roles"`` for a model whose blocks contain
    linear layers that are neither attention nor MLP. ``atol`` and ``rtol`` bound
    the difference of hard and soft outputs.

    Raises:
        InvariantError: an invariant is broken (an ``AssertionError``).
        ValueError: ``skip`` names an unknown invariant.
    """
    skip = set(skip)
    unknown = skip - set(INVARIANTS)
    if unknown:
        raise ValueError(f"unknown invariants {sorted(unknown)} in skip; known ones are {list(INVARIANTS)}")
    args = (args,) if isinstance(args, torch.Tensor) else tuple(args)
    kwargs = dict(kwargs or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm = capture(model, args, kwargs) if not isinstance(model, fx.GraphModule) else copy.deepcopy(model)
    analysis = analyze_quietly(gm)
    if "roles" not in skip:
        check_roles(analysis)
    if "full_rank" not in skip:
        check_full_rank(gm, args, kwargs)
    if plan is None:
        plan = default_plan(analysis)
    check_plan(gm, plan, args, kwargs, skip=skip, atol=atol, rtol=rtol)
    if "invalid_plan" not in skip:
        for bad in standard_invalid_plans(analysis):
            check_rejected(gm, bad, args, kwargs)
        check_rejects_non_finite(gm, analysis)


def analyze_quietly(gm: fx.GraphModule) -> Analysis:
    """Return ``analyze(gm)`` without its warning for graphs without attention."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return analyze(gm)


def default_plan(analysis: Analysis) -> dict[str, Any]:
    """Return a plan that runs both passes.

    It prunes 25% of the MLP neurons, then keeps half the weights of every attention
    and MLP linear.
    """
    roles = sorted({s.role for s in analysis.sites if s.role in ATTENTION_AND_MLP_ROLES})
    plan: dict[str, Any] = {"lrd": [{"roles": roles, "rank": {"keep": 0.5}}]} if roles else {"lrd": []}
    if any(g.unit == "mlp_neurons" and not g.unsupported for g in analysis.groups):
        plan["prune"] = [{"unit": "mlp_neurons", "ratio": 0.25}]
    return plan


# --- invariants on the analysis ---------------------------------------------------


def check_roles(analysis: Analysis) -> None:
    """Check that attention ops have all their projections and blocks have no unroled linear."""
    for op in analysis.attention:
        where = f"attention op {op.node.name} (layer {op.layer})"
        for name in ("q", "k", "v", "out"):
            if getattr(op, name) is None:
                raise InvariantError("roles", f"{where} has no {name} projection")
        _check_geometry(op, where)
    for site in analysis.sites:
        if site.layer is not None and site.role not in ATTENTION_AND_MLP_ROLES:
            raise InvariantError(
                "roles",
                f"{site.path} (layer {site.layer}, {site.in_features}->{site.out_features}) sits in a "
                f"repeated block but has role {site.role!r}",
            )
    if not analysis.attention and analysis.sites:
        raise InvariantError("roles", "no attention op found; every site has role 'other'")


def _check_geometry(op, where: str) -> None:
    heads, kv_heads, head_dim = op.num_heads, op.num_kv_heads, op.head_dim
    if not heads or not kv_heads or not head_dim or heads % kv_heads:
        raise InvariantError("roles", f"{where} has head geometry heads={heads}, kv_heads={kv_heads}, head_dim={head_dim}")
    if op.fused_qkv:
        expected = {op.q.path: (heads + 2 * kv_heads) * head_dim}
    else:
        expected = {op.q.path: heads * head_dim, op.k.path: kv_heads * head_dim, op.v.path: kv_heads * head_dim}
    for path, size in expected.items():
        site = next(s for s in op.sites if s.path == path)
        if site.out_features != size:
            raise InvariantError(
                "roles", f"{path} has {site.out_features} outputs but {where} implies {size} "
                f"(heads={heads}, kv_heads={kv_heads}, head_dim={head_dim})"
            )
    if op.out.in_features != heads * head_dim:
        raise InvariantError("roles", f"{op.out.path} reads {op.out.in_features} inputs, not heads * head_dim = {heads * head_dim}")


# --- invariants on one compression -------------------------------------------------


def check_full_rank(gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """Check that rank ``"full"`` on every attention and MLP site leaves the outputs equal."""
    analysis = analyze_quietly(gm)
    roles = sorted({s.role for s in analysis.sites if s.role in ATTENTION_AND_MLP_ROLES})
    if not roles:
        return
    expected = run(gm, args, kwargs)
    work = copy_module(gm)
    compress(work, {"lrd": [{"roles": roles, "rank": "full"}]})
    lint(work, "full_rank")
    _assert_outputs(run(work, args, kwargs), expected, "full_rank", exact=True)


def check_plan(
    gm: fx.GraphModule,
    plan: Plan | dict,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    skip: Iterable[str] = (),
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> None:
    """Check the invariants of one valid ``plan``, soft and hard, on copies of ``gm``.

    Runs ``lint``, ``restore``, ``hard_soft``, ``param_count`` and ``deterministic``
    unless ``skip`` names them.
    """
    skip = set(skip)
    kwargs = dict(kwargs or {})
    plan_dict = Plan.coerce(plan).to_dict()
    options = compress_options(plan_dict, args, kwargs)
    original = snapshot(gm)
    expected = run(gm, args, kwargs)

    soft = copy_module(gm)
    compress(soft, plan_dict, **options)
    if "lint" not in skip:
        lint_journal(soft)
    soft_state = snapshot(soft)
    soft_output = run(soft, args, kwargs)
    if "deterministic" not in skip:
        again = copy_module(gm)
        compress(again, plan_dict, **options)
        _assert_same_state(snapshot(again), soft_state, "deterministic", "a second soft compress")

    hard = copy_module(gm)
    compress(hard, plan_dict, hard=True, **options)
    if "lint" not in skip:
        lint(hard, "lint")
    hard_output = run(hard, args, kwargs)
    if "hard_soft" not in skip:
        _check_hard_soft(hard_output, soft_output, expected, gm, plan_dict, atol, rtol)
    if "other_sizes" not in skip:
        _check_other_sizes(gm, soft, hard, plan_dict, args, kwargs, atol, rtol)
    if "param_count" not in skip:
        _check_param_count(hard, gm, plan_dict)
    if "deterministic" not in skip:
        again = copy_module(gm)
        compress(again, plan_dict, hard=True, **options)
        _assert_same_state(snapshot(again), snapshot(hard), "deterministic", "a second hard compress")

    if "restore" not in skip:
        restore(soft)
        if "lint" not in skip:
            lint(soft, "lint")
        _assert_same_state(snapshot(soft), original, "restore", "soft compress then restore")
        _assert_outputs(run(soft, args, kwargs), expected, "restore", exact=True)


def check_rejected(gm: fx.GraphModule, plan: Any, args: tuple = (), kwargs: dict | None = None) -> None:
    """Check that ``plan`` raises ``PlanError``, soft and hard, and changes nothing."""
    before = snapshot(gm)
    for hard in (False, True):
        try:
            compress(gm, plan, hard=hard)
        except PlanError:
            pass
        except Exception as err:  # noqa: BLE001 - any other outcome breaks the invariant
            restore_if_soft(gm)
            raise InvariantError(
                "invalid_plan", f"plan {plan!r} (hard={hard}) raised {type(err).__name__}: {err}, not PlanError"
            ) from err
        else:
            restore_if_soft(gm)
            raise InvariantError("invalid_plan", f"plan {plan!r} (hard={hard}) was accepted")
        _assert_same_state(snapshot(gm), before, "invalid_plan", f"rejected plan {plan!r} (hard={hard})")
        if journal_of(gm).entries:
            raise InvariantError("invalid_plan", f"rejected plan {plan!r} left {len(journal_of(gm).entries)} journal entries")


def check_rejects_non_finite(gm: fx.GraphModule, analysis: Analysis) -> None:
    """Check that a NaN in a selected weight raises ``PlanError`` and changes nothing."""
    if not analysis.sites:
        return
    work = copy_module(gm)
    site = analyze_quietly(work).sites[0]
    with torch.no_grad():
        weight, _ = site.tensors(work)
        weight[(0,) * weight.dim()] = float("nan")
    check_rejected(work, {"lrd": [{"paths": [site.path], "rank": 1}]})


def standard_invalid_plans(analysis: Analysis) -> list[dict[str, Any]]:
    """Return a few plans that every model must reject, built from its analysis."""
    if not analysis.sites:
        return []
    site = analysis.sites[0]
    limit = min(site.in_features, site.out_features)
    plans = [
        {"lrd": [{"paths": [site.path], "rank": 0}]},
        {"lrd": [{"paths": [site.path], "rank": limit + 1}]},
        {"lrd": [{"paths": ["no.such.module"], "rank": 1}]},
        {"lrd": [{"roles": ["mlp_down"], "rank": 1, "typo": True}]},
        {"prune": [{"unit": "mlp_neurons", "ratio": 1.0}]},
    ]
    for group in analysis.groups:
        if group.unsupported or group.size < 2:
            continue
        plans.append({"prune": [{"unit": group.unit, "ratio": (group.size - 0.25) / group.size}]})
        break
    return plans


# --- helpers -----------------------------------------------------------------------


def compress_options(plan: dict[str, Any], args: tuple, kwargs: dict) -> dict[str, Any]:
    """Return ``calibration=[example inputs]`` when a rule of ``plan`` needs calibration."""
    if not any(rule.get("method") in CALIBRATED_METHODS or "budget" in rule for rule in plan.get("lrd", [])):
        return {}
    if args and kwargs:
        raise ValueError(
            "calibrated methods and budgets need example inputs that are all positional or all "
            "keyword; pass them as one of args or kwargs"
        )
    return {"calibration": [kwargs if kwargs else args]}


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    with warnings.catch_warnings():
        # Copying the pytree spec of an exported module emits a torch FutureWarning.
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(gm)


def restore_if_soft(gm: fx.GraphModule) -> None:
    if journal_of(gm).state == "soft":
        restore(gm)


def run(gm: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """Return every tensor of the output of ``gm(*args, **kwargs)``, in pytree order."""
    with torch.no_grad():
        output = gm(*args, **kwargs)
    leaves = torch.utils._pytree.tree_leaves(output)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def snapshot(gm: fx.GraphModule) -> tuple[str, dict[str, torch.Tensor]]:
    """Return the code and a copy of every parameter and buffer (duplicates included) of ``gm``."""
    tensors = {name: t.detach().clone() for name, t in gm.named_parameters(remove_duplicate=False)}
    tensors.update({name: t.detach().clone() for name, t in gm.named_buffers(remove_duplicate=False)})
    return gm.code, tensors


def lint(gm: fx.GraphModule, invariant: str) -> None:
    try:
        gm.graph.lint()
    except Exception as err:  # noqa: BLE001 - lint raises RuntimeError and others
        raise InvariantError(invariant, f"graph.lint() failed: {err}") from err


def lint_journal(gm: fx.GraphModule) -> None:
    """Lint the graph after every pass: the snapshot before each later pass, then the current one."""
    entries = journal_of(gm).entries
    for previous, entry in zip(entries, entries[1:]):
        if entry.graph_before is None:
            continue
        try:
            entry.graph_before.lint()
        except Exception as err:  # noqa: BLE001
            raise InvariantError("lint", f"graph.lint() failed after pass {previous.pass_name!r}: {err}") from err
    lint(gm, "lint")


def _assert_same_state(actual, expected, invariant: str, step: str) -> None:
    code, tensors = actual
    expected_code, expected_tensors = expected
    if code != expected_code:
        raise InvariantError(invariant, f"after {step}, gm.code differs:\n{_first_difference(code, expected_code)}")
    if list(tensors) != list(expected_tensors):
        missing = [n for n in expected_tensors if n not in tensors]
        extra = [n for n in tensors if n not in expected_tensors]
        raise InvariantError(
            invariant, f"after {step}, tensor names differ: missing {missing[:5]}, extra {extra[:5]}, "
            "or a different order"
        )
    for name, tensor in expected_tensors.items():
        other = tensors[name]
        if other.dtype != tensor.dtype or other.shape != tensor.shape or not bit_equal(other, tensor):
            raise InvariantError(
                invariant, f"after {step}, tensor {name} differs: {tuple(other.shape)} {other.dtype} "
                f"against {tuple(tensor.shape)} {tensor.dtype}"
            )


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Return whether two tensors of one dtype and shape contain the same bits (NaN equals itself)."""
    if a.numel() == 0:
        return True
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


def _first_difference(code: str, expected: str) -> str:
    for number, (line, other) in enumerate(zip(code.splitlines(), expected.splitlines()), start=1):
        if line != other:
            return f"line {number}: {line.strip()!r}, expected {other.strip()!r}"
    return f"{len(code.splitlines())} lines, expected {len(expected.splitlines())}"


def _assert_outputs(actual, expected, invariant: str, *, exact: bool, atol: float = 0.0, rtol: float = 0.0) -> None:
    if len(actual) != len(expected):
        raise InvariantError(invariant, f"the model returns {len(actual)} tensors, expected {len(expected)}")
    for index, (got, want) in enumerate(zip(actual, expected)):
        if got.shape != want.shape:
            raise InvariantError(invariant, f"output {index} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        if exact:
            if not torch.equal(got, want):
                difference = (got.double() - want.double()).abs().max().item()
                raise InvariantError(invariant, f"output {index} differs by up to {difference:.3g}; expected bit-equal")
            continue
        try:
            torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
        except AssertionError as err:
            raise InvariantError(invariant, f"output {index}: {err}") from err


def _check_hard_soft(hard, soft, dense, gm, plan: dict, atol: float, rtol: float) -> None:
    keep_hidden = hidden_kept(analyze_quietly(gm), plan)
    if keep_hidden is not None:
        soft = [_kept_channels(s, h, d, plan, gm) for s, h, d in zip(soft, hard, dense)]
    _assert_outputs(hard, soft, "hard_soft", exact=False, atol=atol, rtol=rtol)
    for index, tensor in enumerate(hard):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise InvariantError("hard_soft", f"output {index} of the hard-compressed model is not finite")


def _check_other_sizes(gm, soft, hard, plan: dict, args: tuple, kwargs: dict, atol: float, rtol: float) -> None:
    wide_args, wide_kwargs = widen(args), widen(kwargs)
    try:
        dense = run(gm, wide_args, wide_kwargs)
    except Exception:  # noqa: BLE001 - a graph captured with static shapes runs at one size only
        return
    sizes = [tuple(t.shape) for t in torch.utils._pytree.tree_leaves((wide_args, wide_kwargs)) if isinstance(t, torch.Tensor)]
    try:
        soft_output, hard_output = run(soft, wide_args, wide_kwargs), run(hard, wide_args, wide_kwargs)
    except Exception as err:  # noqa: BLE001 - the uncompressed graph runs at these sizes
        raise InvariantError("other_sizes", f"the compressed graph fails on inputs of shapes {sizes}: {type(err).__name__}: {err}") from err
    try:
        _check_hard_soft(hard_output, soft_output, dense, gm, plan, atol, rtol)
    except InvariantError as err:
        raise InvariantError("other_sizes", f"on inputs of shapes {sizes}: {err}") from err


def widen(value: Any) -> Any:
    """Return example inputs one row longer in dim 0, and two longer in dim 1 for integer 2-d tensors."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 1 and value.shape[0] >= 1:
            value = torch.cat([value, value[:1]], dim=0)
        if value.dim() == 2 and not value.is_floating_point() and value.shape[1] >= 2:
            value = torch.cat([value, value[:, :2]], dim=1)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(widen(v) for v in value)
    if isinstance(value, dict):
        return {key: widen(v) for key, v in value.items()}
    return value


def _kept_channels(soft: torch.Tensor, hard: torch.Tensor, dense: torch.Tensor, plan: dict, gm) -> torch.Tensor:
    """Return the channels of a soft output that a hard prune of the hidden size keeps."""
    if soft.shape == hard.shape:
        return soft
    selection = Plan.coerce(plan).resolve_prune(analyze_quietly(gm))
    kept = selection.kept_hidden()
    removed = [i for i in range(soft.shape[-1]) if i not in set(kept)]
    if not torch.equal(soft[..., removed], torch.zeros_like(soft[..., removed])):
        raise InvariantError("hard_soft", f"soft pruning left non-zero values in removed hidden channels {removed[:8]}")
    return soft[..., kept]


def _check_param_count(hard: fx.GraphModule, gm: fx.GraphModule, plan: dict) -> None:
    analysis = analyze_quietly(gm)
    actual = sum(p.numel() for p in hard.parameters())
    if any("budget" in rule for rule in plan.get("lrd", [])):
        _check_budget(hard, analysis, plan)
        return
    predicted = predict_num_params(gm, analysis, plan)
    if actual != predicted:
        rows = {r["path"]: r["params_after"] for r in journal_of(hard).rewrites}
        raise InvariantError(
            "param_count", f"the hard-compressed model has {actual} parameters, the plan predicts "
            f"{predicted} (difference {actual - predicted}); rewritten sites: {rows}"
        )


def _check_budget(hard: fx.GraphModule, analysis: Analysis, plan: dict) -> None:
    rows = {r["path"]: r for r in journal_of(hard).rewrites if str(r.get("method", "")).startswith("lrd")}
    for index, rule in enumerate(plan["lrd"]):
        if "budget" not in rule:
            continue
        fraction = next(iter(rule["budget"].values()))
        # A site takes the last rule that matches it.
        selected = [s for s in analysis.sites if _last_match(plan["lrd"], s) == index]
        dense = sum(s.in_features * s.out_features for s in selected)
        kept = 0
        for site in selected:
            row = rows.get(site.path)
            kept += site.in_features * site.out_features if row is None else row["rank"] * (site.in_features + site.out_features)
        if kept > fraction * dense:
            raise InvariantError("param_count", f"lrd rule {index} keeps {kept} of {dense} weights, over its budget {fraction}")


def _last_match(rules: list[dict], site) -> int | None:
    matches = [index for index, rule in enumerate(rules) if selects(rule, site)]
    return matches[-1] if matches else None
