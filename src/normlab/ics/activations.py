"""The distribution entering each nonlinearity, over training: histograms and percentiles.

Every `every_n_steps` optimizer steps (exactly at steps 0, N, 2N, ..., also when one Lightning
batch runs several optimizer steps) the model runs, in eval mode and without gradients, on the
fixed probe batch (see `normlab.ics.probe`). Forward pre-hooks capture each nonlinearity's input;
they exist only during that probe pass. Logged per layer: the histogram `activations/<layer>`
(TensorBoard only) and the scalars `ics/<layer>/{p15,p50,p85,mean,std}` (every logger).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch

from normlab.ics.cadence import StepCadence
from normlab.ics.history import RecordingCallback
from normlab.ics.probe import probe_activations, probe_batch
from normlab.ics.sinks import log_scalars, tensorboard_writers
from normlab.ics.stats import distribution_stats
from normlab.ics.summary import activation_summary


class ActivationHistograms(RecordingCallback):
    """Histograms and p15/p50/p85/mean/std of each nonlinearity's input every N optimizer steps."""

    def __init__(
        self,
        every_n_steps: int = 50,
        probe_size: int = 256,
        histograms: bool = True,
        bins: int = 64,
        output_dir: str | Path | None = None,
    ) -> None:
        super().__init__(output_dir)
        self.cadence = StepCadence(every_n_steps)
        self.probe_size = probe_size
        self.histograms = histograms
        self.bins = bins  # equal-width bins: 4x cheaper than TensorBoard's default ~1500 buckets
        self.probe: torch.Tensor | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.probe = probe_batch(trainer, self.probe_size)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Called inside every optimizer.step(), before the update: the weights after `step` updates.
        step = trainer.global_step
        if trainer.is_global_zero and self.cadence.due(step) and self.probe is not None:
            self.log_activations(trainer, step, probe_activations(pl_module, self.probe))

    def log_activations(
        self, trainer: pl.Trainer, step: int, activations: dict[str, torch.Tensor]
    ) -> None:
        metrics = {
            f"ics/{layer}/{name}": value
            for layer, x in activations.items()
            for name, value in distribution_stats(x).items()
        }
        log_scalars(trainer, metrics, step)
        self.record(metrics, step)
        if self.histograms:
            for writer in tensorboard_writers(trainer):
                for layer, x in activations.items():
                    values = x.float().cpu()
                    writer.add_histogram(f"activations/{layer}", values, step, bins=self.bins)

    def ics_summary(self) -> dict[str, dict[str, float]]:
        """Per layer: p50 start/end/travel/max shift and the p15-p85 spread at start and end."""
        return activation_summary(self.series())
