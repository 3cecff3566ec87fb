"""The fixed probe batch and the inputs of every nonlinearity on it.

The probe is taken from the validation data (held out from training) once per fit, so every
measurement sees the same samples and the curves over training compare like with like.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import lightning.pytorch as pl
import torch
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
    """The first `size` validation inputs (training inputs when there is no validation data)."""
    datamodule = trainer.datamodule
    loader = datamodule.val_dataloader() if datamodule is not None else None
    if loader is not None:
        return next(iter(loader))[0][:size]
    x, _ = next(iter(trainer.train_dataloader)).flat()  # training batches are MiniBatchStacks
    return x[:size]


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
