"""Per-layer gradient norms (`grads/<layer>/norm`) and weight histograms (`weights/<layer>`).

Meant to run inside `optimizer.step()` (Lightning calls `on_before_optimizer_step` there in
manual optimization too): the gradient is then the one the update is about to use — under DDP
already averaged over processes — at exactly the steps 0, N, 2N, ...
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

from normlab.ics.cadence import StepCadence
from normlab.ics.sinks import log_histogram, log_scalars


def grad_norm(layer: nn.Module) -> float | None:
    """L2 norm of the gradient of all the layer's parameters (weight and bias); None without one."""
    grads = [p.grad.detach().reshape(-1) for p in layer.parameters() if p.grad is not None]
    return torch.cat(grads).norm().item() if grads else None


def log_weight_stats(
    trainer: pl.Trainer, layers: dict[str, nn.Module], step: int, bins: int | None = 64
) -> None:
    """Gradient norm of every layer to every logger; weight histograms (unless `bins` is None)."""
    norms = {f"grads/{name}/norm": grad_norm(layer) for name, layer in layers.items()}
    log_scalars(trainer, {tag: n for tag, n in norms.items() if n is not None}, step)
    if bins is None:
        return
    for name, layer in layers.items():
        log_histogram(trainer, f"weights/{name}", layer.weight, step, bins)


class WeightStats(pl.Callback):
    """Gradient norms and weight histograms alone, every N optimizer steps (`ActivationHistograms`
    logs them too, with `weights=True`: one callback is cheaper than two)."""

    def __init__(self, every_n_steps: int = 200, histograms: bool = True, bins: int = 64) -> None:
        self.cadence = StepCadence(every_n_steps)
        self.bins = bins if histograms else None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and self.cadence.due(step):
            log_weight_stats(trainer, pl_module.weight_layers(), step, self.bins)
