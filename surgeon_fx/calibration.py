"""Calibration: per-site statistics of the inputs of linear sites.

:func:`calibrate` runs batches through a graph module once and accumulates, for
each selected site with input ``x`` of ``n`` channels:

- ``xtx``: the second moment ``sum_t x_t x_t^T`` (``n x n``, float64);
- ``sq_sum``: ``sum_t x_t ** 2`` per channel (the squared channel norms);
- ``abs_sum``: ``sum_t |x_t|`` per channel;
- ``tokens``: the number of tokens counted.

Padding tokens are left out when a batch carries an ``attention_mask``. Memory is
``O(n^2)`` per site whatever the number of batches.

To record inputs, a recorder node is inserted before each site's node and erased
afterwards, so ``gm.code`` and the analysis's node references stay valid. A
blockwise capture cannot run the model, so its sites are recorded on the live
model instead, by forward pre-hooks on the modules at the sites' paths.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import fx, nn

from ._fx_utils import replace_submodule
from .analysis import LinearSite
from .errors import PlanError, SurgeonError

logger = logging.getLogger(__name__)

_RECORDER_PREFIX = "_surgeon_fx_recorder_"


@dataclass
class SiteStats:
    """Accumulated input statistics of one linear site (see the module docstring)."""

    xtx: torch.Tensor
    sq_sum: torch.Tensor
    abs_sum: torch.Tensor
    tokens: int = 0

    @classmethod
    def empty(cls, channels: int) -> SiteStats:
        zeros = torch.zeros(channels, dtype=torch.float64)
        return cls(torch.zeros(channels, channels, dtype=torch.float64), zeros.clone(), zeros.clone())

    def add(self, x: torch.Tensor) -> None:
        """Accumulate the rows of ``x`` of shape ``(tokens, channels)``."""
        x = x.detach().to(torch.float64)
        self.xtx.addmm_(x.T, x)
        self.sq_sum.add_((x * x).sum(0))
        self.abs_sum.add_(x.abs().sum(0))
        self.tokens += x.shape[0]

    def restrict(self, channels: list[int]) -> SiteStats:
        """Return the statistics of the input channels ``channels`` only.

        After pruning removes input channels of a site, its remaining inputs are the
        kept channels of the original input, so these are its statistics.
        """
        index = torch.tensor(channels, dtype=torch.long)
        return SiteStats(self.xtx[index][:, index], self.sq_sum[index], self.abs_sum[index], self.tokens)

    @property
    def covariance(self) -> torch.Tensor:
        """``X^T X / tokens``, the uncentred input covariance."""
        return self.xtx / max(self.tokens, 1)

    @property
    def channel_norms(self) -> torch.Tensor:
        """L2 norm of each input channel over all tokens (the Wanda scale)."""
        return self.sq_sum.sqrt()

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


class CalibrationStats(dict):
    """Statistics per site path, savable with safetensors."""

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for site_path, stats in self.items():
            tensors[f"{site_path}::xtx"] = stats.xtx.contiguous()
            tensors[f"{site_path}::sq_sum"] = stats.sq_sum
            tensors[f"{site_path}::abs_sum"] = stats.abs_sum
            tensors[f"{site_path}::tokens"] = torch.tensor([stats.tokens], dtype=torch.int64)
        save_file(tensors, str(path), metadata={"format": "surgeon_fx.calibration/1"})

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as err:
            raise SurgeonError(f"cannot read calibration statistics from {str(path)!r}: {err}") from err
        stats = cls()
        for key in tensors:
            site_path, _, field = key.rpartition("::")
            if field != "xtx":
                continue
            try:
                stats[site_path] = SiteStats(
                    xtx=tensors[key],
                    sq_sum=tensors[f"{site_path}::sq_sum"],
                    abs_sum=tensors[f"{site_path}::abs_sum"],
                    tokens=int(tensors[f"{site_path}::tokens"][0]),
                )
            except KeyError as err:
                raise SurgeonError(f"calibration file {str(path)!r} lacks {err.args[0]!r}; save it again") from err
        return stats


class _Recorder(nn.Module):
    """Identity module that feeds its input to a :class:`SiteStats`."""

    def __init__(self, stats: SiteStats, context: dict[str, Any]) -> None:
        super().__init__()
        self.stats = stats
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        mask = self.context.get("mask")
        if mask is not None and mask.numel() == rows.shape[0]:
            rows = rows[mask.reshape(-1).bool()]
        self.stats.add(rows)
        return x


def calibrate(
    gm: fx.GraphModule,
    batches: Iterable[Any],
    sites: list[LinearSite],
    progress: Callable[[int], None] | None = None,
    *,
    model: nn.Module | None = None,
) -> CalibrationStats:
    """Run ``batches`` through ``gm`` and return input statistics of ``sites``.

    A batch is a dict of keyword inputs, a tuple of positional inputs or a tensor.
    With ``model`` (the live model ``gm`` was captured from), the batches run
    through ``model`` and hooks record the sites' inputs. A blockwise capture needs
    this.

    Raises:
        PlanError: no batch was given, or a batch does not fit the model's inputs.
    """
    stats = CalibrationStats({site.path: SiteStats.empty(site.in_features) for site in sites})
    context: dict[str, Any] = {}
    if model is None:
        recorders = _insert_recorders(gm, sites, stats, context)
        target: nn.Module = gm
    else:
        handles = _hook_recorders(model, sites, stats, context)
        target = model
    count = 0
    try:
        with torch.no_grad():
            for count, batch in enumerate(batches, start=1):
                _run_batch(target, batch, count - 1, context)
                if progress is not None:
                    progress(count)
    finally:
        if model is None:
            _remove_recorders(gm, sites, recorders)
        else:
            for handle in handles:
                handle.remove()
    if count == 0:
        raise PlanError("the calibration set is empty; pass at least one batch of model inputs")
    logger.info("calibrated %d sites on %d batches", len(sites), count)
    return stats


def _insert_recorders(gm, sites, stats, context) -> list[fx.Node]:
    recorders = []
    for index, site in enumerate(sites):
        name = f"{_RECORDER_PREFIX}{index}"
        replace_submodule(gm, name, _Recorder(stats[site.path], context))
        with gm.graph.inserting_before(site.node):
            recorder = gm.graph.call_module(name, (site.input,))
        site.node.replace_input_with(site.input, recorder)
        recorders.append(recorder)
    gm.recompile()
    return recorders


def _hook_recorders(model: nn.Module, sites, stats, context) -> list:
    def hook_for(recorder: _Recorder):
        def hook(module: nn.Module, args: tuple) -> None:
            recorder(args[0])

        return hook

    return [
        model.get_submodule(site.path).register_forward_pre_hook(hook_for(_Recorder(stats[site.path], context)))
        for site in sites
    ]


def _remove_recorders(gm, sites, recorders) -> None:
    for site, recorder in zip(sites, recorders):
        site.node.replace_input_with(recorder, site.input)
        replace_submodule(gm, recorder.target, None)
        gm.graph.erase_node(recorder)
    gm.recompile()


def _run_batch(gm: nn.Module, batch: Any, index: int, context: dict[str, Any]) -> None:
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    context["mask"] = mask
    try:
        if isinstance(batch, dict):
            gm(**batch)
        elif isinstance(batch, (tuple, list)):
            gm(*batch)
        else:
            gm(batch)
    except Exception as err:  # noqa: BLE001 - any failure means the batch does not fit
        raise PlanError(
            f"calibration batch {index} does not fit the model's inputs: {type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}. Give batches with the "
            "same keys and tensor ranks as the example inputs of capture()"
        ) from err
