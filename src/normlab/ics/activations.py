"""The distribution entering each nonlinearity, over training: histograms and percentiles.

Every `every_n_steps` optimizer steps (exactly at steps 0, N, 2N, ..., also when one Lightning
batch runs several optimizer steps) the model runs, in eval mode and without gradients, on the
fixed probe batch (see `normlab.ics.probe`). Forward pre-hooks capture each nonlinearity's input;
they exist only during that probe pass. Logged per layer: the histogram `activations/<layer>`
(TensorBoard only) and the scalars `ics/<layer>/{p15,p50,p85,mean,std}` (every logger).

The same callback also logs the gradient norms and weight histograms (`weights=True`, see
`normlab.ics.weights`) and writes the TensorBoard dashboard (`layout=True`): Lightning calls every
hook of every callback on every step, and on a small model each extra callback costs ~1 % of the
epoch, more than the measurements themselves at the default cadence.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from threadpoolctl import threadpool_limits

from normlab.ics.cadence import StepCadence
from normlab.ics.history import RecordingCallback
from normlab.ics.layout import write_layout
from normlab.ics.probe import probe_activations, probe_batch
from normlab.ics.sinks import log_histogram, log_scalars
from normlab.ics.stats import distribution_stats
from normlab.ics.summary import activation_summary
from normlab.ics.weights import log_weight_stats


class ActivationHistograms(RecordingCallback):
    """Histograms and p15/p50/p85/mean/std of each nonlinearity's input every N optimizer steps."""

    def __init__(
        self,
        every_n_steps: int = 200,
        probe_size: int = 256,
        histograms: bool = True,
        bins: int = 64,
        weights: bool = True,
        layout: bool = True,
        output_dir: str | Path | None = None,
    ) -> None:
        super().__init__(output_dir)
        self.cadence = StepCadence(every_n_steps)
        self.probe_size = probe_size
        self.histograms = histograms
        self.bins = bins  # equal-width bins: 4x cheaper than TensorBoard's default ~1500 buckets
        self.weights = weights
        self.layout = layout
        self.probe: torch.Tensor | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.probe = probe_batch(trainer, self.probe_size)
        # TensorBoard's histogram summary calls numpy's `dot`, which wakes OpenBLAS's thread pool;
        # its idle threads then busy-wait for ~0.1 s, stealing the core training runs on. These
        # dots are tiny: one BLAS thread is all they need (restored at the end of fit).
        self._blas_threads = threadpool_limits(limits=1, user_api="blas")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        blas_threads = getattr(self, "_blas_threads", None)
        if blas_threads is not None:
            blas_threads.restore_original_limits()
            self._blas_threads = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.layout:
            write_layout(trainer, list(pl_module.nonlinearities()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Called inside every optimizer.step(), before the update: the weights after `step` updates.
        if self.cadence.due(trainer.global_step):
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The trained model is a point too, so "start -> end" in the summary spans all of training.
        if not self.cadence.due(trainer.global_step):
            self.measure(trainer, pl_module)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or self.probe is None:
            return
        self.log_activations(trainer, step, probe_activations(pl_module, self.probe))
        if self.weights:
            bins = self.bins if self.histograms else None
            log_weight_stats(trainer, pl_module.weight_layers(), step, bins)

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
            for layer, x in activations.items():
                log_histogram(trainer, f"activations/{layer}", x, step, self.bins)

    def ics_summary(self) -> dict[str, dict[str, float]]:
        """Per layer: p50 start/end/travel/max shift and the p15-p85 spread at start and end."""
        return activation_summary(self.series())
