"""Precise BatchNorm statistics (Wu & Johnson, 2021, "Rethinking 'Batch' in BatchNorm", Sec. 3):
evaluate with the true population statistics of the current weights instead of the EMA.

During training, BN's running mean and variance are an exponential moving average of batch
statistics taken under *older* weights; the population statistics of the *current* network
differ from it, and the gap shows up as an evaluation error. PreciseBN recomputes them right
before evaluation: with the weights frozen, run N training batches in training mode and set
each BN's running mean/variance to the plain average of the N batch means / unbiased batch
variances -- what ``torch.optim.swa_utils.update_bn`` does (momentum=None: cumulative average).

The `PreciseBN` callback does that before every validation and test, evaluates the model both
ways and logs the EMA evaluation beside the usual one: ``val/acc_ema`` (and ``val/loss_ema``,
``test/acc_ema``, ``test/loss_ema``) against ``val/acc`` etc., now measured with the precise
statistics. After the evaluation the EMA buffers are put back and the random number generators
were never advanced, so training goes on exactly as without the callback.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from normlab.callbacks.no_trace import rng_untouched
from normlab.nn.traits import has_running_stats

__all__ = ["PreciseBN", "batch_norms", "recompute_bn_statistics"]


def batch_norms(model: nn.Module) -> list[nn.Module]:
    """Every layer with BN running statistics (torch's BN, ours, our variants, a user's own)."""
    return [m for m in model.modules() if has_running_stats(m)]


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, inputs: Iterable[torch.Tensor]) -> int:
    """Set every BN's running statistics to the average over the batches ``inputs``.

    Equivalent to ``torch.optim.swa_utils.update_bn`` on the same batches, except that each
    BN's ``num_batches_tracked`` (the step counter of Batch Renorm's schedule) and the model's
    train/eval mode are left as they were. Returns how many batches were used.
    """
    norms = batch_norms(model)
    if not norms:
        return 0
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: each batch gets the same weight
    model.train()
    count = 0
    try:
        for x in inputs:
            model(x)
            count += 1
    finally:
        for m, (momentum, tracked) in zip(norms, saved, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
        model.train(was_training)
    return count


class PreciseBN(pl.Callback):
    """Before each validation/test: population BN statistics from ``num_batches`` training
    batches; logs the EMA evaluation as ``<stage>/acc_ema`` and ``<stage>/loss_ema``."""

    def __init__(self, num_batches: int = 100) -> None:
        if num_batches < 1:
            raise ValueError(f"precise_bn num_batches={num_batches}: it must be at least 1")
        self.num_batches = num_batches
        self._ema: list[torch.Tensor] = []
        self._ema_metrics: dict[str, torch.Tensor] = {}

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._swap_in(trainer, pl_module, "val", trainer.val_dataloaders)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(trainer, pl_module, "test", trainer.test_dataloaders)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out(pl_module)

    def _swap_in(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, loaders: Any
    ) -> None:
        norms = batch_norms(pl_module)
        if not norms or loaders is None:
            return
        loss, acc = _evaluate(pl_module, loaders, trainer)
        self._ema_metrics = {f"{stage}/loss_ema": loss, f"{stage}/acc_ema": acc}
        self._ema = [t.clone() for m in norms for t in (m.running_mean, m.running_var)]
        with rng_untouched(pl_module.device):
            inputs = _training_inputs(trainer, pl_module.device, self.num_batches)
            recompute_bn_statistics(pl_module, inputs)

    def _swap_out(self, pl_module: pl.LightningModule) -> None:
        for name, value in self._ema_metrics.items():
            pl_module.log(name, value)
        self._ema_metrics = {}
        if self._ema:
            with torch.no_grad():
                buffers = [
                    t for m in batch_norms(pl_module) for t in (m.running_mean, m.running_var)
                ]
                for buffer, saved in zip(buffers, self._ema, strict=True):
                    buffer.copy_(saved)
            self._ema = []


def _training_inputs(
    trainer: pl.Trainer, device: torch.device, limit: int
) -> Iterator[torch.Tensor]:
    """Up to ``limit`` training mini-batches (inputs only), from a fresh pass over the data."""
    count = 0
    for batch in trainer.datamodule.train_dataloader():
        for x, _ in _minibatches(batch):
            if count == limit:
                return
            count += 1
            yield x.to(device)


def _minibatches(batch: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The (x, y) mini-batches of one training batch: a stack of optimizer steps' batches."""
    if hasattr(batch, "minibatches"):
        yield from batch.minibatches()
    else:
        xs, ys = batch
        yield from zip(xs, ys, strict=True)


@torch.no_grad()
def _evaluate(pl_module: pl.LightningModule, loaders: Any, trainer: pl.Trainer) -> tuple[Any, Any]:
    """Mean cross-entropy and accuracy over the evaluation data, summed over DDP processes."""
    was_training = pl_module.training
    pl_module.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=pl_module.device)  # loss, correct, n
    try:
        for loader in loaders if isinstance(loaders, list | tuple) else [loaders]:
            for x, y in loader:
                x, y = x.to(pl_module.device), y.to(pl_module.device)
                logits = pl_module(x)
                totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
                totals[1] += (logits.argmax(1) == y).sum()
                totals[2] += len(y)
    finally:
        pl_module.train(was_training)
    if trainer.world_size > 1:
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
    return (totals[0] / totals[2]).float(), (totals[1] / totals[2]).float()
