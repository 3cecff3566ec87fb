"""Per-layer activation histograms: the distribution entering each nonlinearity, over training.

Every `every_n_steps` optimizer steps the model runs, in eval mode and without gradients, on a
fixed probe batch taken from the validation data (held out from training, and the same at
every point, so the curves compare like with like). Forward pre-hooks on the activation
modules capture their inputs; the hooks exist only during that probe pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn


@contextmanager
def capture_inputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the input of each module during the `with` body: `{name: tensor}`."""
    captured: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_pre_hook(
            lambda _module, args, name=name: captured.__setitem__(name, args[0].detach())
        )
        for name, module in modules.items()
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def probe_batch(trainer: pl.Trainer, size: int) -> torch.Tensor:
    """The first `size` validation inputs (falls back to training inputs without val data)."""
    source = trainer.datamodule.val_dataloader() if trainer.datamodule else None
    if source is None:
        source = trainer.train_dataloader
    x = next(iter(source))[0]
    return x.reshape(-1, *x.shape[-3:])[:size] if x.dim() > 4 else x[:size]


@torch.no_grad()
def probe_activations(pl_module: pl.LightningModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs of every nonlinearity for the probe batch, in eval mode (no dropout, no BN update)."""
    was_training = pl_module.training
    pl_module.eval()
    try:
        with capture_inputs(pl_module.nonlinearities()) as captured:
            pl_module(x.to(pl_module.device))
    finally:
        pl_module.train(was_training)
    return captured


class CadenceCallback(pl.Callback):
    """Runs `measure(trainer, pl_module, step)` before training and every N optimizer steps."""

    def __init__(self, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._last_slot = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_slot = trainer.global_step // self.every_n_steps
        if trainer.global_step == 0:
            self.measure(trainer, pl_module, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # One Lightning batch may hold several optimizer steps: fire when a multiple of N is crossed.
        slot = trainer.global_step // self.every_n_steps
        if slot > self._last_slot:
            self._last_slot = slot
            self.measure(trainer, pl_module, trainer.global_step)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        raise NotImplementedError


class ActivationHistograms(CadenceCallback):
    """Logs `activations/<layer>` histograms of each nonlinearity's input every N steps."""

    def __init__(self, every_n_steps: int = 50, probe_size: int = 256) -> None:
        super().__init__(every_n_steps)
        self.probe_size = probe_size
        self.probe: torch.Tensor | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.probe = probe_batch(trainer, self.probe_size)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        activations = probe_activations(pl_module, self.probe)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # histograms are a TensorBoard feature
                for name, values in activations.items():
                    logger.experiment.add_histogram(f"activations/{name}", values.float().cpu(), step)
