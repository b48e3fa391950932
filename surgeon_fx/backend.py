"""The ``torch.compile`` backend: compress each Dynamo graph, then compile it.

Entry point
-----------
:func:`backend` returns a callable for ``torch.compile(model, backend=...)``::

    compiled = torch.compile(model, backend=surgeon_fx.backend(plan, inner="inductor"))

Dynamo calls it once per graph it captures: once for a model without graph breaks,
several times for a model with breaks, and again on every recompilation (a new input
shape, a changed guard). Each call:

1. binds every placeholder whose example input is an ``nn.Parameter`` to that
   tensor (``meta["surgeon_fx_is_param"]``, ``meta["surgeon_fx_tensor"]``), and to its
   name in the model when the model was given (``meta["surgeon_fx_name"]``);
2. analyses the graph with :func:`~surgeon_fx.analysis.analyze`, as for a captured
   graph module, and resolves the plan's LRD rules against its sites;
3. runs the ``decompose_linear_to_inputs`` pass through the
   :class:`~surgeon_fx.passes.PassManager`. It rewrites each selected
   ``linear(x, weight, bias)`` into ``linear(linear(x, v), u, bias)``, where ``v``
   (``rank x in_features``) and ``u`` (``out_features x rank``) are new placeholders
   appended to the graph's inputs. The weight placeholder stays, unused;
4. compiles the rewritten graph with the inner backend and returns a wrapper that
   looks up the factors of the weights it receives and passes them as the extra inputs.

Why factors are inputs, not constants
-------------------------------------
Dynamo passes parameters as inputs and does not guard on which module instance they
come from. One compiled graph can therefore serve several instances of a block class,
such as the layers of a model with a graph break inside its layer loop. Factors baked
into the graph would then apply layer 0's factors to layer 1. The wrapper reads the factors of
the weights it is actually given from a :class:`FactorCache`, keyed by the weight
tensor's identity and version counter: each weight is factorised once, whatever the
number of graphs and recompilations, and again after an in-place update.

When the graph runs with weights other than those it was compiled with, the wrapper
checks once per set of weights that the plan gives them the same ranks. If it does
not, a copy of the graph compressed for those weights runs without the inner backend,
with a :class:`~surgeon_fx.errors.SurgeonWarning`. Without ``model`` the new weights
have no names, so a plan that selects by layer or path raises
:class:`~surgeon_fx.errors.SurgeonError` there rather than return a result the plan
did not ask for.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import fx, nn

from . import layers
from .analysis import Analysis, LinearSite, analyze
from .analysis.linear_sites import split_layer
from .errors import PlanError, SurgeonError, SurgeonWarning
from .passes.decompose_linear_to_inputs import decompose_linear_to_inputs
from .passes.manager import PassManager, snapshot_graph
from .plan import CALIBRATED_METHODS, LRDAction, Plan, _resolve_rank

logger = logging.getLogger(__name__)

CompilerFn = Callable[[fx.GraphModule, list], Callable]


def backend(
    plan: Plan | dict | str | Path,
    inner: str | CompilerFn = "inductor",
    *,
    model: nn.Module | None = None,
) -> CompressionBackend:
    """Return a ``torch.compile`` backend that applies ``plan`` before ``inner``.

    Args:
        plan: a :class:`~surgeon_fx.Plan`, a dict or a TOML/JSON file, as for
            :func:`~surgeon_fx.compress`. Only ``"lrd"`` rules with method ``"svd"``
            are supported.
        inner: the backend that compiles the compressed graph: a name known to
            ``torch._dynamo.lookup_backend`` (``"inductor"``, ``"eager"``, ...) or a
            callable ``(gm, example_inputs) -> callable``.
        model: the module passed to ``torch.compile``. Give it for a model with graph
            breaks: Dynamo then compiles parts of the model as frames of their own,
            whose module paths start at that part (``self_attn.q_proj`` in place of
            ``layers.1.self_attn.q_proj``), which loses layer indices. With ``model``
            the backend names each site after its weight in ``model.named_parameters()``.

    The model itself is never changed: the factors live in the backend's cache, and
    the original weights stay in the model. Factors receive no gradient, so use the
    backend for inference.

    Example::

        >>> plan = {"lrd": [{"roles": ["mlp_down"], "rank": {"keep": 0.5}}]}
        >>> compiler = surgeon_fx.backend(plan, inner="eager", model=model)
        >>> compiled = torch.compile(model, backend=compiler)
        >>> compiled(input_ids)
        >>> compiler.check()            # PlanError if a rule matched no site anywhere
        >>> compiler.reports[0].sites   # ['layers.0.mlp.down_proj', 'layers.1.mlp.down_proj']

    Generated code of one site, before and after (node names shortened)::

        linear_6 = torch._C._nn.linear(mul_3, l_..._down_proj_parameters_weight_, None)
        linear_6 = torch._C._nn.linear(mul_3, surgeon_fx_v_0, None)
        linear_7 = torch._C._nn.linear(linear_6, surgeon_fx_u_0, None)

    Raises:
        PlanError: the plan is invalid, has prune rules or uses a calibrated method.
        SurgeonError: ``inner`` names no registered backend.
    """
    return CompressionBackend(plan, inner, model=model)


@dataclass
class GraphReport:
    """Summary of the rewrite of one Dynamo graph: its sites and the time it took."""

    index: int
    linear_sites: int
    sites: list[str]
    seconds: float  # time added by analysis and rewriting, not by the inner backend


@dataclass
class _CacheEntry:
    weight: weakref.ref
    version: int | None
    factors: tuple[torch.Tensor, torch.Tensor]


@dataclass
class FactorCache:
    """Truncated-SVD factors ``(u, v)`` keyed by the weight and rank they came from.

    An entry is valid while its weight is the same tensor object with the same
    version counter (bumped by every in-place change), so recompiling for a new input
    shape reuses the factors and an optimizer step invalidates them. Entries go away
    with their weight.
    """

    computed: int = 0
    reused: int = 0
    _entries: dict[tuple, _CacheEntry] = field(default_factory=dict, repr=False)

    def factors(self, stored_weight: torch.Tensor, layout: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(u, v)`` with ``u @ v`` the rank-``rank`` approximation of the weight.

        ``layout`` is the site's ``weight_layout``. An ``"in_out"`` weight (GPT-2's
        ``Conv1D``) is transposed to ``(out_features, in_features)`` first.
        """
        key = (id(stored_weight), layout, rank)
        entry = self._entries.get(key)
        if entry is not None and entry.weight() is stored_weight and entry.version == _version(stored_weight):
            self.reused += 1
            return entry.factors
        weight = stored_weight.t() if layout == "in_out" else stored_weight
        # Looked up on the module so that tests can count calls.
        factors = layers.truncated_svd(weight, rank)
        self.computed += 1
        self._entries[key] = _CacheEntry(
            weakref.ref(stored_weight, lambda _, key=key: self._entries.pop(key, None)),
            _version(stored_weight),
            factors,
        )
        return factors


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors have no version counter
        return None


class CompressionBackend:
    """A ``torch.compile`` backend that compresses each graph as its plan specifies.

    Attributes:
        plan: the validated plan.
        cache: the factor cache shared by every graph this backend compiles.
        reports: one :class:`GraphReport` per graph compiled, in order.
    """

    def __init__(self, plan: Plan | dict | str | Path, inner: str | CompilerFn, *, model: nn.Module | None) -> None:
        self.plan = Plan.coerce(plan)
        _reject_unsupported_rules(self.plan)
        self.inner = _lookup_inner(inner)
        self.model = model
        self.cache = FactorCache()
        self.reports: list[GraphReport] = []
        self._rule_matches = [0] * len(self.plan.lrd)
        self._weight_ids: dict[str, int] = {}  # site path -> id of its weight
        self._warned_paths = False

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        start = time.perf_counter()
        pristine = _copy_dynamo_graph_module(gm)
        gm = _copy_dynamo_graph_module(gm)
        names = self._parameter_names()
        _bind_parameters(gm, example_inputs, names)
        analysis = _analyze_quietly(gm)
        if self.model is None:
            self._warn_on_relative_paths(gm, analysis)
        for index, rule in enumerate(self.plan.lrd):
            self._rule_matches[index] += sum(rule.selector.matches(s) for s in analysis.sites)
        # TODO: prune rules are rejected for now. They would plug in here as a pass run
        # before the LRD pass, with pruned weights or masks passed as extra inputs like
        # the factors, since weights are inputs. Hard pruning of a coupling group whose
        # sites span several graphs must fall back to soft masks, warning with the sites.
        slots, compressed, factors = self._rewrite(gm, analysis, example_inputs)
        report = GraphReport(
            index=len(self.reports),
            linear_sites=len(analysis.sites),
            sites=[slot.site.path for slot in compressed],
            seconds=time.perf_counter() - start,
        )
        self.reports.append(report)
        _log_report(report, compressed)
        compiled = self.inner(gm, [*example_inputs, *_static_examples(gm, example_inputs, factors)])
        if not compressed:
            return compiled
        return _CompiledGraph(self, compiled, pristine, slots, compressed, list(example_inputs))

    def _rewrite(self, gm: fx.GraphModule, analysis: Analysis, inputs: list) -> tuple[list, list, list]:
        """Decompose the sites the plan selects in ``gm``, with factors as new inputs.

        Returns the slots of all linear sites, those of the compressed sites, and
        the factor inputs ``v_0, u_0, v_1, u_1, ...`` for the weights in ``inputs``.
        """
        # NOTE: a rule with a "budget" shares it among the sites of this graph only.
        # With graph breaks the ranks can differ from those compress() picks for the
        # whole model, although each graph still meets the budget.
        resolved = self.plan.resolve_lrd(analysis, require_match=False)
        # Only weights that arrive as inputs can be swapped for factors. With inlined
        # built-in modules (always on in torch 2.13) every parameter does.
        actions = [a for a in resolved if a.rank is not None and _weight_is_input(a.site)]
        slots, compressed = _slots(gm, analysis, actions)
        factors = self._factors(inputs, compressed)
        if actions:
            pairs = list(zip(factors[1::2], factors[0::2]))
            PassManager(gm).run([("decompose_linear_to_inputs", decompose_linear_to_inputs(actions, pairs))])
        return slots, compressed, factors

    def _factors(self, inputs: list, compressed: list[_Slot]) -> list[torch.Tensor]:
        extra = []
        for slot in compressed:
            u, v = self.cache.factors(inputs[slot.weight_index], slot.site.weight_layout, slot.rank)
            extra += [v, u]
        return extra

    def _parameter_names(self) -> dict[int, str] | None:
        if self.model is None:
            return None
        return {id(p): name for name, p in self.model.named_parameters()}

    def _warn_on_relative_paths(self, gm: fx.GraphModule, analysis: Analysis) -> None:
        # Two different weights under one path mean that Dynamo compiled the same
        # block class as separate frames (a graph break), so paths lost their prefix.
        clashes = []
        for site in analysis.sites:
            weight_id = id(site.tensors(gm)[0])
            if self._weight_ids.setdefault(site.path, weight_id) != weight_id:
                clashes.append(site.path)
        if clashes and not self._warned_paths:
            self._warned_paths = True
            warnings.warn(
                f"sites with different weights share the paths {clashes[:4]} across Dynamo "
                "graphs: a graph break made Dynamo compile parts of the model as separate "
                "frames, whose paths have no layer index, so rules with 'layers' or 'paths' "
                "may select the wrong sites. Pass model= to surgeon_fx.backend()",
                SurgeonWarning,
                stacklevel=2,
            )

    @property
    def unmatched_rules(self) -> list[int]:
        """Indices of the LRD rules that matched no site in any graph compiled so far."""
        return [i for i, count in enumerate(self._rule_matches) if count == 0]

    def check(self) -> None:
        """Raise :class:`PlanError` for rules that matched no site in any graph so far.

        Call it after the first forward of the compiled model, when Dynamo has
        compiled every graph of the model.
        """
        if not self.reports:
            raise PlanError("the backend has compiled no graph yet; run the compiled model once, then check")
        unmatched = self.unmatched_rules
        if unmatched:
            details = "; ".join(f"lrd rule {i} {self.plan.lrd[i].selector.to_dict()}" for i in unmatched)
            raise PlanError(
                f"{details} matched no linear site in the {len(self.reports)} graphs compiled so far; "
                "fix the selectors, or pass model= to backend() so that paths and layers "
                "are named from the model's parameters"
            )


@dataclass
class _Slot:
    """A linear site of a compiled graph and where its weight sits among the inputs."""

    site: LinearSite
    weight_index: int
    rank: int | None  # None: the graph leaves this site dense


def _slots(gm: fx.GraphModule, analysis: Analysis, actions: list[LRDAction]) -> tuple[list[_Slot], list[_Slot]]:
    """Return a slot per site whose weight is an input, and the slots of ``actions``."""
    positions = {n: i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}
    ranks = {a.site: a.rank for a in actions}
    slots = [
        _Slot(site, positions[site.weight_node], ranks.get(site))
        for site in analysis.sites
        if _weight_is_input(site)
    ]
    by_site = {slot.site: slot for slot in slots}
    return slots, [by_site[a.site] for a in actions]


class _CompiledGraph:
    """The callable the backend returns for a graph it compressed.

    Each call looks up the factors of the weights it receives and passes them as the
    graph's extra inputs. Dynamo may call it with the weights of another instance of
    the same block class. The plan is then checked once for those weights: when it
    gives them the same ranks the compiled graph serves them too, and otherwise a
    variant of the graph compressed for them runs without the inner backend.
    """

    def __init__(self, backend: CompressionBackend, compiled: Callable, pristine: fx.GraphModule,
                 slots: list[_Slot], compressed: list[_Slot], inputs: list) -> None:
        self.backend = backend
        self.compiled = compiled
        self.pristine = pristine
        self.slots = slots
        self.compressed = compressed
        self.expected = [inputs[slot.weight_index] for slot in slots]
        self.variants: dict[tuple[int, ...], tuple[Callable, list[_Slot]]] = {}

    def __call__(self, *args: Any) -> Any:
        run, compressed = self._select(args)
        return run(*args, *self.backend._factors(args, compressed))

    def _select(self, args: tuple) -> tuple[Callable, list[_Slot]]:
        weights = [args[slot.weight_index] for slot in self.slots]
        if all(w is e for w, e in zip(weights, self.expected)):
            return self.compiled, self.compressed
        key = tuple(id(w) for w in weights)
        if key not in self.variants:
            self.variants[key] = self._variant(weights, list(args))
        return self.variants[key]

    def _variant(self, weights: list[torch.Tensor], args: list) -> tuple[Callable, list[_Slot]]:
        plan = self.backend.plan
        names = self.backend._parameter_names()
        if names is None:
            if any(r.selector.layers is not None or r.selector.paths is not None for r in plan.lrd):
                raise SurgeonError(
                    f"Dynamo reused the graph compiled for {self.slots[0].site.path!r} and its "
                    "neighbours for other weights (another instance of the same block class), "
                    "and the plan selects by 'layers' or 'paths', which cannot be checked without "
                    "names. Pass model= to surgeon_fx.backend()"
                )
            return self.compiled, self.compressed  # rules by role give every instance the same ranks
        renamed = [_renamed(slot.site, names.get(id(w))) for slot, w in zip(self.slots, weights)]
        compiled_for = _plan_signature(plan, [slot.site for slot in self.slots])
        if _plan_signature(plan, renamed) == compiled_for:
            return self.compiled, self.compressed
        gm = _copy_dynamo_graph_module(self.pristine)
        _bind_parameters(gm, args, names)
        slots, compressed, _ = self.backend._rewrite(gm, _analyze_quietly(gm), args)
        warnings.warn(
            f"Dynamo reused the graph compiled for {self.slots[0].site.path!r} and its neighbours "
            f"for the weights of {renamed[0].path!r} (another instance of the same block class), "
            "which the plan compresses differently; that graph now runs compressed as the plan "
            "says but without the inner backend. Keep graph breaks out of repeated blocks, or "
            "give them the same rules, to compile every block",
            SurgeonWarning,
            stacklevel=2,
        )
        return gm, compressed


def _static_examples(gm: fx.GraphModule, inputs: list, factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Return the example inputs of the factor placeholders for the inner backend.

    AOTAutograd (torch 2.13) turns a real example input without a Dynamo source
    into a fake tensor with symbolic sizes, which later fails to produce guards. The
    placeholders' own static fake tensors avoid that; the real factors stand in when
    the graph has no fake tensors.
    """
    extra = gm.graph.find_nodes(op="placeholder")[len(inputs):]
    return [node.meta.get("example_value", factor) for node, factor in zip(extra, factors)]


def _weight_is_input(site: LinearSite) -> bool:
    return site.weight_node is not None and site.weight_node.op == "placeholder"


def _renamed(site: LinearSite, weight_name: str | None) -> LinearSite:
    if weight_name is None:
        return site
    path = weight_name.removesuffix(".weight")
    block, layer = split_layer(path)
    return dataclasses.replace(site, path=path, block=block, layer=layer)


def _plan_signature(plan: Plan, sites: list[LinearSite]) -> tuple:
    """Return, per site, the index of the last LRD rule selecting it and its rank."""
    signature = []
    for site in sites:
        chosen = None
        for index, rule in enumerate(plan.lrd):
            if rule.selector.matches(site):
                chosen = index
        if chosen is None:
            signature.append(None)
        elif plan.lrd[chosen].budget is not None:
            signature.append((chosen, "budget"))
        else:
            signature.append((chosen, _resolve_rank(plan.lrd[chosen], chosen, site)))
    return tuple(signature)


def _reject_unsupported_rules(plan: Plan) -> None:
    if plan.prune:
        raise PlanError(
            f"the torch.compile backend supports only 'lrd' rules, and the plan has "
            f"{len(plan.prune)} 'prune' rules; remove them, or prune with "
            "surgeon_fx.compress(surgeon_fx.capture(model, args), plan) and compile the result"
        )
    for index, rule in enumerate(plan.lrd):
        if rule.method in CALIBRATED_METHODS:
            raise PlanError(
                f"lrd rule {index} uses method {rule.method!r}, which needs calibration data "
                "that the torch.compile backend does not see; use method 'svd', or compress "
                "a captured graph module with surgeon_fx.compress(gm, plan, calibration=...)"
            )


def _lookup_inner(inner: str | CompilerFn) -> CompilerFn:
    if callable(inner):
        return inner
    try:
        return torch._dynamo.lookup_backend(inner)
    except torch._dynamo.exc.InvalidBackend as err:
        raise SurgeonError(
            f"inner backend {inner!r} is not registered with torch._dynamo; use one of "
            f"{['eager', *torch._dynamo.list_backends()]} or pass a callable (gm, example_inputs)"
        ) from err


def _copy_dynamo_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a copy of ``gm`` whose graph can be rewritten.

    Dynamo keeps using the graph it hands over: after the backend returns, it reads
    every placeholder's ``meta["grapharg"]`` to generate the call of the compiled
    graph, so new placeholders in that graph would break the call.
    """
    graph = snapshot_graph(gm.graph)
    for old, new in zip(gm.graph.nodes, graph.nodes):
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    copy = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copy.meta.update(gm.meta)
    # NOTE: private attributes that Dynamo sets and AOTAutograd reads (torch 2.13).
    for name in ("_param_name_to_source", "_source_to_user_stacks"):
        if hasattr(gm, name):
            setattr(copy, name, getattr(gm, name))
    return copy


def _bind_parameters(gm: fx.GraphModule, example_inputs: list, names: dict[int, str] | None) -> None:
    """Mark the placeholders that carry parameters, for the analysis to read them."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if not isinstance(value, nn.Parameter):
            continue
        node.meta["surgeon_fx_is_param"] = True
        node.meta["surgeon_fx_tensor"] = value
        if names is not None and id(value) in names:
            node.meta["surgeon_fx_name"] = names[id(value)]


def _analyze_quietly(gm: fx.GraphModule) -> Analysis:
    # A graph cut off by a break may contain no attention op (an embedding, a pooler),
    # and analyze() warns about that, which is expected here.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analysis = analyze(gm)
    for warning in caught:
        logger.debug("analysis of a Dynamo graph: %s", warning.message)
    return analysis


def _log_report(report: GraphReport, compressed: list[_Slot]) -> None:
    logger.info(
        "graph %d: compressed %d of %d linear sites in %.1f ms: %s",
        report.index,
        len(report.sites),
        report.linear_sites,
        report.seconds * 1000,
        ", ".join(f"{slot.site.path} (rank {slot.rank})" for slot in compressed) or "none",
    )
