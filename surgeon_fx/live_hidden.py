"""Hidden-size pruning of a live model: the modules besides linear layers that change.

Pruning the hidden size (the residual stream) removes channels from every tensor a
hidden-size group couples (see :mod:`surgeon_fx.analysis.coupling`). Linear layers
become :class:`~surgeon_fx.live.MaskedLinear` as for any pruning. The other modules
are handled here, one per kind:

- A norm (``LayerNorm``, an RMSNorm of any model) must normalise the kept channels
  only, as the smaller model will. Soft mode puts in :class:`KeptChannelNorm`: it
  gathers the kept channels, normalises them with a smaller copy of the norm and
  scatters the result back among zeros.
- An embedding table or convolution that writes the stream (token, position and
  patch embeddings) gets :class:`MaskedChannels`, which zeroes the removed
  channels of its output.

Hard mode puts in the smaller copies (:func:`shrink`) and sets the hidden size on
the modules that own the changed ones and on the tower's config. Any other module
with a hidden-size parameter (a class token, a position table held directly by a
model) raises :class:`~surgeon_fx.errors.PlanError` before any change.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ._fx_utils import node_module_path, op_name
from .analysis.coupling import CouplingGroup
from .errors import PlanError

# Integer attributes that contain a hidden size: on the modules that own a changed
# module (``embed_dim`` of a patch embedding, ``hidden_size`` of a patch merger,
# which is ``4 * hidden``) and on the tower's config.
HIDDEN_ATTRS = ("hidden_size", "embed_dim", "dim", "d_model", "n_embd", "context_dim")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Operations between an RMSNorm's mean(x ** 2) and its weight: add eps, rsqrt, mul, cast.
_NORM_REACH = 6


class KeptChannelNorm(nn.Module):
    """A norm over the kept channels of a wider stream: gather, ``inner``, scatter.

    ``inner`` is the norm at the kept size; the removed channels of the output are zero.
    """

    def __init__(self, inner: nn.Module, kept: list[int], size: int) -> None:
        super().__init__()
        self.inner = inner
        self.size = size
        self.register_buffer("index", torch.tensor(kept, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = self.inner(x.index_select(-1, self.index))
        out = small.new_zeros(*small.shape[:-1], self.size)
        return out.index_copy(-1, self.index, small)

    def to_hard(self) -> nn.Module:
        return self.inner

    def extra_repr(self) -> str:
        return f"kept={self.index.numel()}, size={self.size}"


class MaskedChannels(nn.Module):
    """``inner(...)`` with the removed channels of dimension ``dim`` of its output set to zero."""

    def __init__(self, inner: nn.Module, mask: torch.Tensor, dim: int) -> None:
        super().__init__()
        self.inner = inner
        self.dim = dim
        self.register_buffer("mask", mask)

    def __getattr__(self, name: str) -> Any:
        # Model code reads the wrapped layer's attributes (``proj.weight.dtype``,
        # ``embed_tokens.padding_idx``): they come from ``inner``.
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("inner")  # absent while unpickling
            if inner is None:
                raise
            return getattr(inner, name)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.inner(*args, **kwargs)
        shape = [1] * y.dim()
        shape[self.dim] = -1
        return y * self.mask.view(shape).to(y.dtype)

    def to_hard(self) -> nn.Module:
        kept = self.mask.nonzero().flatten().tolist()
        axis = 1 if isinstance(self.inner, nn.Embedding) else 0
        return shrink(self.inner, {name: (axis if name == "weight" else 0, kept) for name, _ in _own_params(self.inner)})

    def extra_repr(self) -> str:
        return f"kept={int(self.mask.count_nonzero())}, dim={self.dim}"


@dataclass
class HiddenChange:
    """The soft module of one non-linear module that hidden-size pruning changes."""

    path: str
    soft_module: nn.Module | None
    row: dict[str, Any]


def hidden_changes(model: nn.Module, selection, *, build: bool = True) -> list[HiddenChange]:
    """Return the soft module of every norm, embedding and convolution the selection prunes.

    With ``build=False`` only the rows are made and ``soft_module`` is ``None``.

    Raises:
        PlanError: a pruned parameter belongs to a module of another kind.
    """
    changes = []
    for action in selection.actions:
        group = action.group
        if group.unit != "hidden":
            continue
        params = _params_by_module(group, selection)
        norms = norm_paths(group)
        for path in norms:
            changes.append(_norm_change(model, path, params.pop(path, {}), action.kept, group, build))
        for path, kept_by_param in params.items():
            changes.append(_stream_writer_change(model, path, kept_by_param, action.kept, group, build))
    return changes


def norm_module_path(node: fx.Node) -> str | None:
    """Return the path of the norm module that computed the normalisation ``node``, if known.

    Export records the module path of each node. A graph traced on real tensors
    (a block that does not export) has none, so the owner of the norm's weight
    is used instead: the ``weight`` argument of ``layer_norm``, or the parameter that
    scales an RMSNorm's ``mean(x ** 2)`` a few operations further on.
    """
    path = node_module_path(node)
    if path is not None:
        return path
    if op_name(node) in ("layer_norm", "rms_norm"):
        weights = [a for a in node.args[1:] if isinstance(a, fx.Node) and a.op == "get_attr"]
        return weights[0].target.rpartition(".")[0] if weights else None
    # NOTE: an RMSNorm without a weight is matched to the next scaling parameter,
    # which may belong to another module; only the hard-mode output check catches that.
    frontier, seen = [node], set()
    for _ in range(_NORM_REACH):
        frontier = [user for n in frontier for user in n.users if user not in seen]
        seen.update(frontier)
        for user in frontier:
            if op_name(user) == "mul":
                params = [a for a in user.args if isinstance(a, fx.Node) and a.op == "get_attr"]
                if params:
                    return params[0].target.rpartition(".")[0]
    return None


def norm_paths(group: CouplingGroup) -> list[str]:
    """Return the module paths of the norms of a hidden-size group."""
    if group.norm_modules:
        return list(group.norm_modules)
    paths = []
    for node in group.norm_nodes:
        path = norm_module_path(node)
        if path is None:
            raise PlanError(
                f"the normalisation {node.name} on the hidden size has no module path, so compress_model() "
                "cannot replace it; prune the captured graph with surgeon_fx.compress() instead"
            )
        if path not in paths:
            paths.append(path)
    return paths


def shrink(module: nn.Module, kept_by_param: dict[str, tuple[int, list[int]]]) -> nn.Module:
    """Return a copy of ``module`` with each named parameter cut to the kept indices of one dim.

    Size attributes that torch modules keep (``embedding_dim``, ``out_channels``,
    ``normalized_shape``) follow the new sizes.
    """
    small = copy.deepcopy(module)
    for name, (dim, kept) in kept_by_param.items():
        tensor = getattr(module, name)
        index = torch.tensor(kept, dtype=torch.long, device=tensor.device)
        new = tensor.detach().index_select(dim, index).clone()
        if isinstance(tensor, nn.Parameter):
            setattr(small, name, nn.Parameter(new, requires_grad=tensor.requires_grad))
        else:
            small._buffers[name] = new
    if kept_by_param:
        size = len(next(iter(kept_by_param.values()))[1])
        if isinstance(small, nn.Embedding):
            small.embedding_dim = size
        elif isinstance(small, _CONVS):
            small.out_channels = size
        if isinstance(getattr(small, "normalized_shape", None), tuple):
            small.normalized_shape = (size,)
    return small


def _params_by_module(group: CouplingGroup, selection) -> dict[str, dict[str, tuple[int, list[int]]]]:
    found: dict[str, dict[str, tuple[int, list[int]]]] = {}
    for slot in group.slots:
        if slot.kind != "param":
            continue
        path, _, name = slot.target.rpartition(".")
        found.setdefault(path, {})[name] = (slot.axis, selection.param_indices[(slot.target, slot.axis)])
    return found


def _norm_change(model, path: str, kept_by_param: dict, kept: list[int], group: CouplingGroup, build: bool):
    module = _module(model, path)
    for name, tensor in _own_params(module):
        if tensor.dim() != 1 or tensor.shape[0] != group.size or name not in kept_by_param:
            raise PlanError(
                f"the norm {path} ({type(module).__name__}) has the parameter {name!r} of shape "
                f"{list(tensor.shape)}, which is not one value per hidden channel; compress_model() "
                "cannot prune its hidden size. Prune the captured graph with surgeon_fx.compress() instead"
            )
    soft = KeptChannelNorm(shrink(module, kept_by_param), kept, group.size) if build else None
    return HiddenChange(path, soft, _row(path, "norm", module, len(kept), group.size))


def _stream_writer_change(model, path: str, kept_by_param: dict, kept: list[int], group: CouplingGroup, build: bool):
    module = _module(model, path)
    if isinstance(module, nn.Embedding) and set(kept_by_param) == {"weight"} and kept_by_param["weight"][0] == 1:
        role, dim = "embedding", -1
    elif isinstance(module, _CONVS) and all(axis == 0 for axis, _ in kept_by_param.values()):
        role, dim = "conv", 1
    else:
        names = ", ".join(f"{name!r} (dim {axis})" for name, (axis, _) in kept_by_param.items())
        raise PlanError(
            f"pruning the hidden size changes {names} of {path} ({type(module).__name__}), and compress_model() "
            "changes only linear, embedding, convolution and norm layers of a live model. Prune the captured "
            "graph with surgeon_fx.compress(), or remove the 'hidden' prune rule (pruning_ratio_skip_connections)"
        )
    soft = None
    if build:
        mask = torch.zeros(group.size, dtype=module.weight.dtype, device=module.weight.device)
        mask[kept] = 1
        soft = MaskedChannels(copy.deepcopy(module), mask, dim)
    return HiddenChange(path, soft, _row(path, role, module, len(kept), group.size))


def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise PlanError(
            f"the hidden-size tensors of {path!r} are not held by a module at that path in "
            f"{type(model).__name__}; prune the captured graph with surgeon_fx.compress() instead"
        ) from err


def _own_params(module: nn.Module):
    return [(name, p) for name, p in module.named_parameters(recurse=False)]


def _row(path: str, role: str, module: nn.Module, kept: int, size: int) -> dict[str, Any]:
    before = sum(p.numel() for _, p in _own_params(module))
    return {
        "path": path, "role": role, "layer": _layer(path), "method": "prune:hidden", "rank": None,
        "ratio": round(1 - kept / size, 4), "params_before": before, "params_after": before // size * kept,
        "class": type(module).__name__, "shapes": {name: list(p.shape) for name, p in _own_params(module)},
    }


def _layer(path: str) -> int | None:
    numbers = [int(part) for part in path.split(".") if part.isdigit()]
    return numbers[-1] if numbers else None


__all__ = ["KeptChannelNorm", "MaskedChannels", "hidden_changes", "shrink"]
