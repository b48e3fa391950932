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
   appended to the graph's inputs. The weight placeholder stays, unused. Sites that
   prune rules select read a masked weight (and bias) from new placeholders instead
   (``mask_linear_inputs``);
4. compiles the rewritten graph with the inner backend and returns a wrapper that
   looks up the factors of the weights it receives and passes them as the extra inputs.

Why factors are inputs, not constants
-------------------------------------
Dynamo passes parameters as inputs and does not guard on which module instance they
come from. One compiled graph can therefore serve several instances of a block class,
such as the layers of a model with a graph break inside its layer loop. Factors baked
into the graph would then apply layer 0's factors to layer 1. The wrapper therefore
reads the factors of the weights it receives from a :class:`FactorCache`, keyed by
the weight tensor's identity and version counter. Each weight is factorised once,
whatever the number of graphs and recompilations, and again after an in-place update.

Soft pruning works the same way: a pruned site reads a copy of its weight with the
removed rows and columns zeroed, from a new input, and the kept channels are data,
not graph structure.

When the graph runs with weights other than those it was compiled with, the wrapper
resolves the plan once for that set of weights on a copy of the original graph. If
the result has the same structure (the same sites, ranks and masked biases), the
compiled graph serves those weights with their own factors and masks. If it does
not, the rewritten copy runs without the inner backend, with a
:class:`~surgeon_fx.errors.SurgeonWarning`. Without ``model`` the new weights have
no names, so a plan that selects by layer or path raises
:class:`~surgeon_fx.errors.SurgeonError` there rather than return a result the plan
did not ask for.
"""

from __future__ import annotations

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
from .errors import PlanError, SurgeonError, SurgeonWarning
from .passes.decompose_linear_to_inputs import decompose_linear_to_inputs, mask_linear_inputs
from .passes.prune_select import PruneSelection, _selects, select_channels
from .passes.manager import PassManager, snapshot_graph
from .plan import CALIBRATED_METHODS, LRDAction, Plan

logger = logging.getLogger(__name__)

CompilerFn = Callable[[fx.GraphModule, list], Callable]

# Units whose soft pruning (zeroed rows and columns) equals their hard pruning.
BACKEND_PRUNE_UNITS = ("mlp_neurons", "heads")


def backend(
    plan: Plan | dict | str | Path,
    inner: str | CompilerFn = "inductor",
    *,
    model: nn.Module | None = None,
) -> CompressionBackend:
    """Return a ``torch.compile`` backend that applies ``plan`` before ``inner``.

    Args:
        plan: a :class:`~surgeon_fx.Plan`, a dict or a TOML/JSON file, as for
            :func:`~surgeon_fx.compress`. Supported: ``"lrd"`` rules with method
            ``"svd"``, and ``"prune"`` rules for the units ``"mlp_neurons"`` and
            ``"heads"``, which are applied soft (masked weights, see below).
        inner: the backend that compiles the compressed graph: a name known to
            ``torch._dynamo.lookup_backend`` (``"inductor"``, ``"eager"``, ...) or a
            callable ``(gm, example_inputs) -> callable``.
        model: the module passed to ``torch.compile``. Give it for a model with graph
            breaks: Dynamo then compiles parts of the model as frames of their own,
            whose module paths start at that part (``self_attn.q_proj`` in place of
            ``layers.1.self_attn.q_proj``), which loses layer indices. With ``model``
            the backend names each site after its weight in ``model.named_parameters()``.

    The model itself is never changed: the factors and masked weights live in the
    backend's caches, and the original weights stay in the model. Pruned sites read a
    copy of their weight with the removed rows and columns zeroed, which gives the
    outputs of hard pruning (checked against ``compress(..., hard=True)`` in the
    tests) but not its speed-up. A site may be pruned or decomposed, not both.
    Factors and masks receive no gradient, so use the backend for inference.

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
        PlanError: the plan is invalid, prunes the hidden size or uses a calibrated method.
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
    pruned: list[str] = field(default_factory=list)  # soft-pruned sites


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
        self.masks = _MaskCache()
        self._rule_matches = [0] * len(self.plan.lrd)
        self._prune_matches = [0] * len(self.plan.prune)
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
        self._count_matches(analysis)
        layout, extra = self._rewrite(gm, analysis, example_inputs)
        report = GraphReport(
            index=len(self.reports),
            linear_sites=len(analysis.sites),
            sites=[slot.site.path for slot in layout.compressed],
            seconds=time.perf_counter() - start,
            pruned=[slot.site.path for slot in layout.masks],
        )
        self.reports.append(report)
        _log_report(report, layout)
        compiled = self.inner(gm, [*example_inputs, *_static_examples(gm, example_inputs, extra)])
        if not layout.compressed and not layout.masks:
            return compiled
        return _CompiledGraph(self, compiled, pristine, layout, list(example_inputs))

    def _count_matches(self, analysis: Analysis) -> None:
        for index, rule in enumerate(self.plan.lrd):
            self._rule_matches[index] += sum(rule.selector.matches(s) for s in analysis.sites)
        for index, rule in enumerate(self.plan.prune):
            groups = [g for g in analysis.groups if g.unit == rule.unit]
            self._prune_matches[index] += sum(_selects(rule, index, g) for g in groups)

    def _rewrite(self, gm: fx.GraphModule, analysis: Analysis, inputs: list) -> tuple[_Layout, list]:
        """Compress the sites the plan selects in ``gm``, reading new tensors from new inputs.

        Returns the layout of the new inputs and their values for the weights in
        ``inputs``: the factors ``v_0, u_0, v_1, u_1, ...``, then the masked weights
        (and biases) of pruned sites.
        """
        # NOTE: a rule with a "budget" shares it among the sites of this graph only.
        # With graph breaks the ranks can differ from those compress() picks for the
        # whole model, although each graph still meets the budget.
        resolved = self.plan.resolve_lrd(analysis, require_match=False)
        # Only weights that arrive as inputs can be swapped. With inlined built-in
        # modules (always on in torch 2.13) every parameter does.
        actions = [a for a in resolved if a.rank is not None and _weight_is_input(a.site)]
        selection = self._select_channels(analysis)
        layout = _layout(gm, analysis, actions, selection)
        extra = self._extra_inputs(inputs, layout)
        factors = extra[: 2 * len(actions)]
        masked = [self.masks.masked(inputs, slot) for slot in layout.masks]
        passes = []
        if actions:
            pairs = list(zip(factors[1::2], factors[0::2]))
            passes.append(("decompose_linear_to_inputs", decompose_linear_to_inputs(actions, pairs)))
        if layout.masks:
            sites = [slot.site for slot in layout.masks]
            passes.append(("mask_linear_inputs", mask_linear_inputs(sites, masked)))
        if passes:
            PassManager(gm).run(passes)
        return layout, extra

    def _select_channels(self, analysis: Analysis) -> PruneSelection | None:
        """Return the channels that the prune rules keep in this graph, or ``None``."""
        rules = [
            rule for index, rule in enumerate(self.plan.prune)
            if any(g.unit == rule.unit and _selects(rule, index, g) for g in analysis.groups)
        ]
        if not rules:
            return None
        # NOTE: messages about a rule give its index among the rules that match this graph.
        selection = select_channels(rules, analysis)
        # TODO: pruning here is always soft (masked weights): the same outputs as hard
        # pruning, without its speed-up. Hard pruning needs compact weights as inputs
        # and rewritten shape constants in the Dynamo graph.
        _warn_on_partial_groups(selection)
        if selection.param_indices:
            raise PlanError(
                f"pruning here would also cut the parameters {sorted(p for p, _ in selection.param_indices)}, "
                "which the torch.compile backend does not support; prune with surgeon_fx.compress"
            )
        return selection

    def _extra_inputs(self, inputs: list | tuple, layout: _Layout) -> list[torch.Tensor]:
        extra = []
        for slot in layout.compressed:
            u, v = self.cache.factors(inputs[slot.weight_index], slot.site.weight_layout, slot.rank)
            extra += [v, u]
        for slot in layout.masks:
            weight, bias = self.masks.masked(inputs, slot)
            extra += [weight] if bias is None else [weight, bias]
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
    def unmatched_rules(self) -> list[str]:
        """The rules that matched no site or group in any graph compiled so far, as
        ``"lrd 0"`` or ``"prune 1"``."""
        unmatched = [f"lrd {i}" for i, count in enumerate(self._rule_matches) if count == 0]
        return unmatched + [f"prune {i}" for i, count in enumerate(self._prune_matches) if count == 0]

    def check(self) -> None:
        """Raise :class:`PlanError` for rules that matched nothing in any graph so far.

        Call it after the first forward of the compiled model, when Dynamo has
        compiled every graph of the model.
        """
        if not self.reports:
            raise PlanError("the backend has compiled no graph yet; run the compiled model once, then check")
        details = []
        for name in self.unmatched_rules:
            kind, index = name.split()
            rules = self.plan.lrd if kind == "lrd" else self.plan.prune
            details.append(f"{kind} rule {index} {rules[int(index)].selector.to_dict()}")
        if details:
            raise PlanError(
                f"{'; '.join(details)} matched nothing in the {len(self.reports)} graphs compiled so far; "
                "fix the selectors, or pass model= to backend() so that paths and layers "
                "are named from the model's parameters"
            )


@dataclass
class _Slot:
    """A compressed site of a graph and where its weight sits among the inputs."""

    site: LinearSite
    weight_index: int
    rank: int


@dataclass
class _MaskSlot:
    """A soft-pruned site: where its weight and bias sit, and the channels it keeps."""

    site: LinearSite
    weight_index: int
    bias_index: int | None
    kept_out: list[int] | None  # None: no output channel removed
    kept_in: list[int] | None

    @property
    def masks_bias(self) -> bool:
        return self.bias_index is not None and self.kept_out is not None


@dataclass
class _Layout:
    """The extra inputs of a rewritten graph: factors first, then masked weights."""

    compressed: list[_Slot]
    masks: list[_MaskSlot]
    weights: list[int]  # input positions of every linear site's weight

    def structure(self) -> tuple:
        """Return what the rewritten graph depends on; kept channels are only data."""
        return (
            tuple((s.weight_index, s.rank) for s in self.compressed),
            tuple((m.weight_index, m.masks_bias) for m in self.masks),
        )


def _layout(gm: fx.GraphModule, analysis: Analysis, actions: list[LRDAction],
            selection: PruneSelection | None) -> _Layout:
    positions = {n: i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}
    compressed = [_Slot(a.site, positions[a.site.weight_node], a.rank) for a in actions]
    pruned = [s for s in selection.sites.values() if _weight_is_input(s)] if selection else []
    overlap = sorted({a.site.path for a in actions} & {s.path for s in pruned})
    if overlap:
        raise PlanError(
            f"the sites {overlap} are selected by both prune and lrd rules, and the torch.compile "
            "backend applies one of the two per site; narrow the rules, or prune and decompose "
            "with surgeon_fx.compress on a captured graph module"
        )
    masks = [
        _MaskSlot(
            site,
            positions[site.weight_node],
            positions.get(site.bias_node),
            selection.site_indices.get((site.path, "out")),
            selection.site_indices.get((site.path, "in")),
        )
        for site in pruned
    ]
    weights = [positions[s.weight_node] for s in analysis.sites if _weight_is_input(s)]
    return _Layout(compressed, masks, weights)


class _MaskCache:
    """Soft-pruned copies of weights and biases, keyed by tensor identity, version and mask.

    After an in-place update of a weight its new values are masked again, but the kept
    channels stay those chosen when the graph was compiled.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple] = {}

    def masked(self, inputs: list | tuple, slot: _MaskSlot) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = inputs[slot.weight_index]
        bias = inputs[slot.bias_index] if slot.masks_bias else None
        key = (id(weight), id(bias), _as_key(slot.kept_out), _as_key(slot.kept_in))
        state = (_version(weight), _version(bias) if bias is not None else None)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is weight and entry[1] == state:
            return entry[2]
        value = _mask(weight, bias, slot)
        self._entries[key] = (weakref.ref(weight, lambda _, key=key: self._entries.pop(key, None)), state, value)
        return value


def _as_key(kept: list[int] | None) -> tuple[int, ...] | None:
    return None if kept is None else tuple(kept)


def _mask(weight: torch.Tensor, bias: torch.Tensor | None, slot: _MaskSlot) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Zero the removed output rows and input columns of ``weight``, and the bias entries.

    A zeroed row makes the channel's output 0 and a zeroed column ignores the input
    channel, which is what the hard-pruned layer computes on the kept channels.
    """
    out_dim, in_dim = (0, 1) if slot.site.weight_layout == "out_in" else (1, 0)
    masked = weight.detach().clone()
    if slot.kept_out is not None:
        masked.index_fill_(out_dim, _removed(slot.kept_out, weight.shape[out_dim], weight.device), 0)
    if slot.kept_in is not None:
        masked.index_fill_(in_dim, _removed(slot.kept_in, weight.shape[in_dim], weight.device), 0)
    if bias is not None:
        bias = bias.detach().clone().index_fill_(0, _removed(slot.kept_out, bias.shape[0], bias.device), 0)
    return masked, bias


def _removed(kept: list[int], size: int, device: torch.device) -> torch.Tensor:
    keep = set(kept)
    return torch.tensor([i for i in range(size) if i not in keep], dtype=torch.long, device=device)


class _CompiledGraph:
    """The callable the backend returns for a graph it rewrote.

    Each call looks up the factors and masked weights of the weights it receives and
    passes them as the graph's extra inputs. Dynamo may call it with the weights of
    another instance of the same block class. The plan is then resolved once for
    those weights on a copy of the original graph. When the result has the same
    structure (the same sites and ranks), the compiled graph serves them with their
    own factors and masks. Otherwise that rewritten copy runs without the inner backend.
    """

    def __init__(self, backend: CompressionBackend, compiled: Callable, pristine: fx.GraphModule,
                 layout: _Layout, inputs: list) -> None:
        self.backend = backend
        self.compiled = compiled
        self.pristine = pristine
        self.layout = layout
        self.expected = [inputs[i] for i in layout.weights]
        # id tuple of the weights -> (those weights, callable, layout)
        self.variants: dict[tuple[int, ...], tuple[list, Callable, _Layout]] = {}

    def __call__(self, *args: Any) -> Any:
        run, layout = self._select(args)
        return run(*args, *self.backend._extra_inputs(args, layout))

    def _select(self, args: tuple) -> tuple[Callable, _Layout]:
        weights = [args[i] for i in self.layout.weights]
        if all(w is e for w, e in zip(weights, self.expected)):
            return self.compiled, self.layout
        key = tuple(id(w) for w in weights)
        variant = self.variants.get(key)
        if variant is None or any(w is not v for w, v in zip(weights, variant[0])):
            variant = self.variants[key] = (weights, *self._variant(list(args)))
        return variant[1], variant[2]

    def _variant(self, args: list) -> tuple[Callable, _Layout]:
        plan = self.backend.plan
        names = self.backend._parameter_names()
        by_name = any(r.selector.layers is not None or r.selector.paths is not None for r in [*plan.lrd, *plan.prune])
        if names is None and by_name:
            raise SurgeonError(
                f"Dynamo reused the graph compiled for {self._first_path()!r} and its "
                "neighbours for other weights (another instance of the same block class), "
                "and the plan selects by 'layers' or 'paths', which cannot be checked without "
                "names. Pass model= to surgeon_fx.backend()"
            )
        gm = _copy_dynamo_graph_module(self.pristine)
        _bind_parameters(gm, args, names)
        analysis = _analyze_quietly(gm)
        layout, _ = self.backend._rewrite(gm, analysis, args)
        if layout.structure() == self.layout.structure():
            return self.compiled, layout
        warnings.warn(
            f"Dynamo reused the graph compiled for {self._first_path()!r} and its neighbours "
            f"for the weights of {analysis.sites[0].path!r} and its neighbours (another instance "
            "of the same block class), which the plan compresses differently; that graph "
            "now runs compressed as the plan specifies "
            "but without the inner backend. Keep graph breaks out of repeated blocks, or "
            "give them the same rules, to compile every block",
            SurgeonWarning,
            stacklevel=2,
        )
        return gm, layout

    def _first_path(self) -> str:
        sites = self.layout.compressed or self.layout.masks
        return sites[0].site.path


def _static_examples(gm: fx.GraphModule, inputs: list, factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Return the example inputs of the factor placeholders for the inner backend.

    AOTAutograd (torch 2.13) turns a real example input without a Dynamo source
    into a fake tensor with symbolic sizes, which later fails to produce guards. The
    placeholders' own static fake tensors avoid that; the real factors stand in when
    the graph has no fake tensors.
    """
    extra = gm.graph.find_nodes(op="placeholder")[len(inputs):]
    return [node.meta.get("example_value", factor) for node, factor in zip(extra, factors)]


def _warn_on_partial_groups(selection: PruneSelection) -> None:
    # A graph break inside a block leaves part of a coupling group in another graph.
    # Masking the part in this graph is still exact, but channels are scored on fewer
    # weights than compress() uses, so it may keep other channels.
    consumer = {"heads": "attn_out", "mlp_neurons": "mlp_down"}
    for action in selection.actions:
        group = action.group
        if consumer.get(group.unit) not in {site.role for site in group.sites}:
            warnings.warn(
                f"the {group.unit} group of {[s.path for s in group.sites]} has sites in another "
                "Dynamo graph (a graph break inside the block); the backend masks these sites "
                "and scores channels on their weights only, so it may keep other channels "
                "than surgeon_fx.compress",
                SurgeonWarning,
                stacklevel=2,
            )


def _weight_is_input(site: LinearSite) -> bool:
    return site.weight_node is not None and site.weight_node.op == "placeholder"


def _reject_unsupported_rules(plan: Plan) -> None:
    for index, rule in enumerate(plan.prune):
        if rule.criterion == "activation":
            raise PlanError(
                f"prune rule {index} uses criterion 'activation', which needs calibration data "
                "that the torch.compile backend does not see; use 'magnitude' or 'random', or "
                "prune a captured graph module with surgeon_fx.compress(gm, plan, calibration=...)"
            )
        if rule.unit not in BACKEND_PRUNE_UNITS:
            # Masking hidden channels is not hard pruning: a norm over the hidden size
            # would still divide by the full size.
            raise PlanError(
                f"prune rule {index} prunes unit {rule.unit!r}, which the torch.compile backend "
                f"does not support (it supports {list(BACKEND_PRUNE_UNITS)}); prune it with "
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

    Dynamo keeps using the graph it hands over. After the backend returns, it reads
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


def _log_report(report: GraphReport, layout: _Layout) -> None:
    logger.info(
        "graph %d: compressed %d and pruned %d of %d linear sites in %.1f ms: %s",
        report.index,
        len(layout.compressed),
        len(layout.masks),
        report.linear_sites,
        report.seconds * 1000,
        ", ".join(
            [f"{slot.site.path} (rank {slot.rank})" for slot in layout.compressed]
            + [f"{slot.site.path} (pruned)" for slot in layout.masks]
        ) or "none",
    )
