"""Where the ICS callbacks write: scalars to every logger, histograms and layouts to TensorBoard."""

from __future__ import annotations

import lightning.pytorch as pl
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
