"""Per-layer gradient norms (`grads/<layer>/norm`) and weight histograms (`weights/<layer>`).

Measured inside `optimizer.step()` (Lightning calls `on_before_optimizer_step` there in manual
optimization too), so the gradient is the one the update is about to use — under DDP already
averaged over processes — at exactly the steps 0, N, 2N, ...
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

from normlab.ics.cadence import StepCadence
from normlab.ics.sinks import log_scalars, tensorboard_writers


def grad_norm(layer: nn.Module) -> float | None:
    """L2 norm of the gradient of all the layer's parameters (weight and bias); None without one."""
    grads = [p.grad.detach().reshape(-1) for p in layer.parameters() if p.grad is not None]
    return torch.cat(grads).norm().item() if grads else None


class WeightStats(pl.Callback):
    """Gradient norm scalars and weight histograms of each weight layer every N optimizer steps."""

    def __init__(self, every_n_steps: int = 50, histograms: bool = True, bins: int = 64) -> None:
        self.cadence = StepCadence(every_n_steps)
        self.histograms = histograms
        self.bins = bins

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        if not (trainer.is_global_zero and self.cadence.due(step)):
            return
        layers = pl_module.weight_layers()
        norms = {name: grad_norm(layer) for name, layer in layers.items()}
        log_scalars(
            trainer, {f"grads/{name}/norm": n for name, n in norms.items() if n is not None}, step
        )
        if self.histograms:
            for writer in tensorboard_writers(trainer):
                for name, layer in layers.items():
                    weight = layer.weight.detach().float().cpu()
                    writer.add_histogram(f"weights/{name}", weight, step, bins=self.bins)
