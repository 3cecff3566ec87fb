"""The ICS callbacks: when to measure, where the numbers go, what is kept for `metrics.json`.

- `ICSMonitor` (conf/callbacks/default.yaml, key `ics`): on a fixed probe batch, every N
  optimizer steps (exactly at steps 0, N, 2N, ..., also when one Lightning batch runs several
  optimizer steps), the input of each nonlinearity as p15/p50/p85/mean/std scalars and each
  layer's gradient norm (cheap: dense by default); every M steps also the histograms of the
  nonlinearity inputs, norm outputs and weights (expensive: sparse by default).
- `GradShift` (callbacks=ics): gradient-based ICS (`ics/<layer>/grad_shift`, `grad_cos`).
- `WeightStats`: gradient norms and weight histograms alone.

Scalars go to every logger, histograms and the custom-scalars dashboard to TensorBoard only. Each
callback keeps what it logged, so `ics_summary()` can put per-layer numbers in `metrics.json`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary
from threadpoolctl import ThreadpoolController
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import histogram

from normlab.callbacks.measure import (
    ActivationProbe,
    check_probe_mode,
    distribution_stats,
    grad_norm,
    grad_shift,
    probe_batch,
    trained_weight,
)
from normlab.callbacks.summary import activation_summary, grad_shift_summary
from normlab.results.dashboard import Layout, ics_layout
from normlab.results.runs import Series, read_scalars, sorted_layers

# ---------------------------------------------------------------- cadence


class StepCadence:
    """Every `every_n_steps` optimizer steps, starting at step 0."""

    def __init__(self, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps

    def due(self, step: int) -> bool:
        """Is `step` a multiple of N?"""
        return step % self.every_n_steps == 0

    def due_within(self, start: int, n_steps: int) -> bool:
        """Does a multiple of N lie in the steps `start, ..., start + n_steps - 1`?"""
        next_due = -(-start // self.every_n_steps) * self.every_n_steps
        return next_due < start + max(n_steps, 1)


# ---------------------------------------------------------------- where numbers go


def log_scalars(
    trainer: pl.Trainer,
    metrics: dict[str, float],
    step: int,
    histograms: dict[str, torch.Tensor] | None = None,
    bins: int = 64,
) -> None:
    """Send scalars to every logger of the trainer (TensorBoard, CSV, ...) at optimizer `step`,
    and the `histograms` (tag -> values) to its TensorBoard loggers (histograms exist only there).

    TensorBoard gets everything as one event (one summary holding every value) rather than one
    event per scalar or histogram, as `log_metrics` and `add_histogram` write them: TensorBoard's
    writer thread opens, appends to and closes the event file once per event. The event files
    read the same: one series per tag.
    """
    tensorboard = any(isinstance(logger, TensorBoardLogger) for logger in trainer.loggers)
    binned = histogram_values(histograms, bins) if histograms and tensorboard else []
    for logger in trainer.loggers:
        if not isinstance(logger, TensorBoardLogger):
            if metrics:
                logger.log_metrics(metrics, step=step)
            continue
        values = list(binned)
        if getattr(logger, "_prefix", ""):  # Lightning prefixes the scalar tags itself
            if metrics:
                logger.log_metrics(metrics, step=step)
        else:
            values += [Summary.Value(tag=t, simple_value=float(v)) for t, v in metrics.items()]
        if values:
            logger.experiment._get_file_writer().add_summary(Summary(value=values), step)


def histogram_values(histograms: dict[str, torch.Tensor], bins: int) -> list[Summary.Value]:
    """TensorBoard histograms (equal-width `bins`) of the finite values of each tensor.

    A diverged model has NaN/inf weights and activations; TensorBoard refuses to bin those, and a
    measurement must never be what fails a run, so they are left out (all of them: no histogram).
    Tensors that are the same data (a norm's output entering the nonlinearity is both
    `norm_out/<layer>` and `preact/<layer>`) are binned once.
    """
    values, binned = [], {}
    for tag, x in histograms.items():
        same_data = (x.device, x.dtype, x.data_ptr(), tuple(x.shape), x.stride())
        if same_data not in binned:
            binned[same_data] = _histogram(x, bins)
        if binned[same_data] is not None:
            values.append(Summary.Value(tag=tag, histo=binned[same_data]))
    return values


def _histogram(x: torch.Tensor, bins: int) -> HistogramProto | None:
    flat = x.detach().float().cpu().reshape(-1)
    finite = torch.isfinite(flat)
    if not finite.all():
        flat = flat[finite]
    if flat.numel() == 0:
        return None
    return histogram("", flat, bins).value[0].histo  # what SummaryWriter.add_histogram writes


def tensorboard_writers(trainer: pl.Trainer) -> list[SummaryWriter]:
    """The SummaryWriters of the trainer's TensorBoard loggers (the dashboard layout goes there)."""
    loggers = trainer.loggers
    return [logger.experiment for logger in loggers if isinstance(logger, TensorBoardLogger)]


def log_weight_stats(
    trainer: pl.Trainer, layers: dict[str, nn.Module], step: int, bins: int | None = 64
) -> None:
    """Gradient norm of every layer to every logger; weight histograms (unless `bins` is None)."""
    weights = {f"weights/{name}": layer.weight for name, layer in layers.items()}
    log_scalars(trainer, grad_norms(layers), step, weights if bins else None, bins or 64)


def norm_scalars(norms: dict[str, nn.Module]) -> dict[str, float]:
    """`norm/<layer>/<name>` for every norm layer with a `scalars()` method (e.g. the mixture
    weights of Switchable Norm): what a norm wants watched, logged at the ICS cadence."""
    return {
        f"norm/{layer}/{name}": value
        for layer, norm in norms.items()
        if callable(getattr(norm, "scalars", None))
        for name, value in norm.scalars().items()
    }


def grad_norms(layers: dict[str, nn.Module]) -> dict[str, float]:
    """`grads/<layer>/norm` of every layer that has a gradient (one host read for all)."""
    norms = {f"grads/{name}/norm": grad_norm(layer, read=False) for name, layer in layers.items()}
    norms = {tag: norm for tag, norm in norms.items() if norm is not None}
    if not norms:
        return {}
    return dict(zip(norms, torch.stack(list(norms.values())).tolist(), strict=True))


# ---------------------------------------------------------------- the TensorBoard dashboard


def write_layout(trainer: pl.Trainer, layers: list[str], grads: bool = True) -> None:
    """Add the dashboard to every TensorBoard logger of the trainer (rank 0 only), with the
    sections of every callback that has a `layout_section(layers)`."""
    if not trainer.is_global_zero:
        return
    sections: Layout = {}
    for callback in trainer.callbacks:
        if hasattr(callback, "layout_section"):
            sections.update(callback.layout_section(layers))
    for writer in tensorboard_writers(trainer):
        writer.add_custom_scalars(ics_layout(layers, sections, grads))


@functools.cache
def thread_pools() -> ThreadpoolController:
    """The thread pools of the libraries loaded in this process (BLAS, OpenMP), found once: the
    search opens every loaded library, and a sweep's worker runs one fit after another."""
    return ThreadpoolController()


# ---------------------------------------------------------------- recording for metrics.json


class RecordingCallback(pl.Callback):
    """Keeps every scalar it logged (`tag -> {step: value}`) for its `ics_summary()`.

    The record is part of the callback's checkpoint state, so a resumed run summarizes the whole
    run. Under `ddp_spawn` training happens in child processes and this object (in the parent)
    never sees a value: it then reads back what rank 0 wrote to the event files under
    `output_dir`, or summarizes nothing when no `output_dir` was given.
    """

    prefix = "ics/"  # the tags this callback logs, read back from event files when needed

    def __init__(self, output_dir: str | Path | None = None) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.history: Series = {}

    def record(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.history.setdefault(tag, {})[step] = value

    def series(self) -> Series:
        """What was logged here, or (not trained in this process) what the event files hold."""
        if self.history or self.output_dir is None or not self.output_dir.exists():
            return self.history
        return read_scalars(self.output_dir, prefix=self.prefix)

    def state_dict(self) -> dict[str, Any]:
        return {"history": {tag: dict(points) for tag, points in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {tag: dict(points) for tag, points in state_dict.get("history", {}).items()}


# ---------------------------------------------------------------- callbacks


class ICSMonitor(RecordingCallback):
    """Every N optimizer steps (`every_n_steps`), on a fixed probe batch: p15/p50/p85/mean/std
    of the input of each nonlinearity, and with `weights=True` each layer's gradient norm. Every
    M steps (`histogram_every_n_steps`, default N; a multiple of N keeps them on the same
    steps) also the histograms: nonlinearity inputs, norm outputs and, with `weights=True`,
    weights. At the start, the TensorBoard dashboard (`layout=True`).

    One callback does it all: Lightning calls every hook of every callback on every step, and on
    a small model each extra callback costs more than the measurements themselves.
    """

    def __init__(
        self,
        every_n_steps: int = 200,
        probe_size: int = 256,
        histograms: bool = True,
        bins: int = 64,
        weights: bool = True,
        layout: bool = True,
        probe_mode: str = "batch",
        output_dir: str | Path | None = None,
        histogram_every_n_steps: int | None = None,
    ) -> None:
        super().__init__(output_dir)
        self.probe_mode = check_probe_mode(probe_mode)  # fails at construction, not mid-run
        self.cadence = StepCadence(every_n_steps)
        self.histogram_cadence = StepCadence(histogram_every_n_steps or every_n_steps)
        self.probe_size = probe_size
        self.histograms = histograms
        self.bins = bins  # equal-width bins: 4x cheaper than TensorBoard's default ~1500 buckets
        self.weights = weights
        self.layout = layout
        self.probe: torch.Tensor | None = None
        # what a measurement needs from the model, looked up at the first one of a fit
        self._activations: ActivationProbe | None = None
        self._weight_layers: dict[str, nn.Module] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._activations = None
        if trainer.is_global_zero:
            self.probe = probe_batch(trainer, self.probe_size)
        # TensorBoard's histogram summary calls numpy's `dot`, which wakes OpenBLAS's thread pool;
        # its idle threads then busy-wait for ~0.1 s, stealing the core training runs on. These
        # dots are tiny: one BLAS thread is all they need (restored at the end of fit).
        self._blas_threads = thread_pools().limit(limits=1, user_api="blas")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._activations = None
        blas_threads = getattr(self, "_blas_threads", None)
        if blas_threads is not None:
            blas_threads.restore_original_limits()
            self._blas_threads = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.layout:
            write_layout(trainer, list(pl_module.nonlinearities()), grads=self.weights)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Called inside every optimizer.step(), before the update: the weights after `step` updates.
        step = trainer.global_step
        if self.cadence.due(step) or self.histogram_cadence.due(step):
            self.measure(trainer, pl_module, histograms=self.histogram_cadence.due(step))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The trained model is a point too, so "start -> end" in the summary spans all of training
        # (histograms included: the last distribution is the one people look at).
        step = trainer.global_step
        if not self.cadence.due(step):
            self.measure(trainer, pl_module)
        elif not self.histogram_cadence.due(step):
            self.measure(trainer, pl_module, scalars=False)

    def measure(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        histograms: bool = True,
        scalars: bool = True,
    ) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or self.probe is None:
            return
        histograms = histograms and self.histograms
        # the backbone alone: the LightningModule's torchmetrics modules hash their whole state
        # each time a module walk meets them (model.modules(), model.train())
        model = getattr(pl_module, "backbone", pl_module)
        if self._activations is None:
            self._activations = ActivationProbe(model, self.probe, self.probe_mode)
            self._weight_layers = pl_module.weight_layers() if self.weights else {}
        preact, norm_out = self._activations()
        layers = self._weight_layers
        # logged with the activations: one event
        extra = {**grad_norms(layers), **norm_scalars(self._activations.norms)} if scalars else {}
        extra_histograms = {
            **{f"norm_out/{layer}": x for layer, x in norm_out.items()},
            **{f"weights/{name}": layer.weight for name, layer in layers.items()},
        } if histograms else {}
        self.log_activations(trainer, step, preact, histograms, scalars, extra, extra_histograms)

    def log_activations(
        self,
        trainer: pl.Trainer,
        step: int,
        activations: dict[str, torch.Tensor],
        histograms: bool = True,
        scalars: bool = True,
        extra: dict[str, float] | None = None,
        extra_histograms: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """ics/<layer>/* scalars (recorded for metrics.json) and the `preact/<layer>` histograms,
        logged with the `extra` scalars and `extra_histograms` as one event."""
        metrics = {
            f"ics/{layer}/{name}": value
            for layer, x in activations.items()
            for name, value in distribution_stats(x).items()
        } if scalars else {}
        preact = {f"preact/{layer}": x for layer, x in activations.items()}
        binned = {**preact, **(extra_histograms or {})} if histograms and self.histograms else {}
        log_scalars(trainer, {**metrics, **(extra or {})}, step, binned, self.bins)
        self.record(metrics, step)

    def ics_summary(self) -> dict[str, dict[str, float]]:
        """Per layer: p50 start/end/travel/max shift and the p15-p85 spread at start and end."""
        return activation_summary(self.series())


class GradShift(RecordingCallback):
    """Logs `ics/<layer>/grad_shift` and `ics/<layer>/grad_cos` every N optimizer steps.

    Measured at the start of a Lightning batch, on its first mini-batch, with the module's real
    optimizer; with several optimizer steps per batch, at the start of each batch whose steps
    contain a multiple of N (logged at the batch's first step). The loss is cross-entropy.
    Rank 0 only, on its own share of the batch.
    """

    def __init__(self, every_n_steps: int = 200, output_dir: str | Path | None = None) -> None:
        super().__init__(output_dir)
        self.cadence = StepCadence(every_n_steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if not (trainer.is_global_zero and self.cadence.due_within(step, len(batch))):
            return
        x, y = batch.first()  # a MiniBatchStack
        optimizer = pl_module.optimizers(use_pl_optimizer=False)
        weights = {name: trained_weight(layer) for name, layer in pl_module.weight_layers().items()}
        shifts = grad_shift(pl_module, optimizer, weights, lambda: F.cross_entropy(pl_module(x), y))
        metrics = {}
        for name, (shift, cos) in shifts.items():
            metrics.update({f"ics/{name}/grad_shift": shift, f"ics/{name}/grad_cos": cos})
        log_scalars(trainer, metrics, step)
        self.record(metrics, step)

    def layout_section(self, layers: list[str]) -> Layout:
        """Dashboard charts per layer; the first layer has no gradient shift (nothing before it)."""
        measured = sorted_layers(layers)[1:]
        return {
            "ICS: gradient shift ||G - G'|| (Santurkar et al. 2018)": {
                f"{layer} {stat}": ["Multiline", [f"ics/{layer}/{stat}"]]
                for layer in measured
                for stat in ("grad_shift", "grad_cos")
            }
        } if measured else {}

    def ics_summary(self) -> dict[str, dict[str, float]]:
        """Per layer: mean grad_shift and mean grad_cos over the measured steps."""
        return grad_shift_summary(self.series())


class WeightStats(pl.Callback):
    """Gradient norms and weight histograms alone, every N optimizer steps (`ICSMonitor`
    logs them too, with `weights=True`: one callback is cheaper than two)."""

    def __init__(self, every_n_steps: int = 200, histograms: bool = True, bins: int = 64) -> None:
        self.cadence = StepCadence(every_n_steps)
        self.bins = bins if histograms else None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and self.cadence.due(step):
            log_weight_stats(trainer, pl_module.weight_layers(), step, self.bins)
