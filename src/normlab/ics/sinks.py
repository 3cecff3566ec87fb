"""Where the ICS callbacks write: scalars to every logger, histograms and layouts to TensorBoard."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard import SummaryWriter


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Send scalars to every logger of the trainer (TensorBoard, CSV, ...) at optimizer `step`."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def tensorboard_writers(trainer: pl.Trainer) -> list[SummaryWriter]:
    """The SummaryWriters of the trainer's TensorBoard loggers (histograms exist only there)."""
    loggers = trainer.loggers
    return [logger.experiment for logger in loggers if isinstance(logger, TensorBoardLogger)]


def log_histogram(
    trainer: pl.Trainer, tag: str, values: torch.Tensor, step: int, bins: int
) -> None:
    """Histogram of the finite `values` to every TensorBoard logger (histograms exist only there).

    A diverged model has NaN/inf weights and activations; TensorBoard refuses to bin those, and a
    measurement must never be what fails a run, so they are left out (all of them: no histogram).
    """
    values = values.detach().float().cpu().reshape(-1)
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return
    for writer in tensorboard_writers(trainer):
        writer.add_histogram(tag, values, step, bins=bins)
