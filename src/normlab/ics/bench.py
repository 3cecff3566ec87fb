"""What the ICS callbacks cost: epoch time with them / without, on the default run.

Both variants are built from the real default config (digits, MLP 32-32 with BN, batch 32, the
default cadence of `conf/callbacks/default.yaml`) and trained side by side in this process,
interleaved, so that load from other processes hits both alike. Epoch 0 (warm-up) is left out;
the score of a variant is its fastest repeat (other processes on the machine only ever add time),
timed over whole epochs so that it contains every measurement the cadence made.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import DictConfig


class EpochClock(pl.Callback):
    """Seconds of each training epoch (validation included), by `clock`."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = self.clock()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(self.clock() - self._start)


def logging_overhead(
    quick: bool = False, repeats: int | None = None, epochs: int | None = None, wall: bool = False
) -> float:
    """Epoch time with the default ICS callbacks / without (1.0 = free), best of `repeats`.

    CPU time of this process by default (steadier on a shared machine than wall time, and it
    counts TensorBoard's writer thread); `wall=True` measures wall-clock time instead.
    """
    repeats = repeats or (3 if quick else 7)
    epochs = epochs or (4 if quick else 8)
    clock = time.perf_counter if wall else time.process_time
    with tempfile.TemporaryDirectory(prefix="normlab-ics-bench-") as tmp:
        cfg = _default_config(Path(tmp))
        times: dict[bool, list[float]] = {False: [], True: []}
        for repeat in range(repeats):
            for with_ics in (repeat % 2 == 0, repeat % 2 == 1):  # alternate which goes first
                seconds = _epoch_seconds(cfg, with_ics, epochs, clock)
                times[with_ics].append(sum(seconds[1:]))
    return min(times[True]) / min(times[False])


def _epoch_seconds(
    cfg: DictConfig, with_ics: bool, epochs: int, clock: Callable[[], float]
) -> list[float]:
    from hydra.utils import instantiate

    from normlab.models.module import ClassifierModule

    pl.seed_everything(cfg.seed, verbose=False)
    datamodule = instantiate(cfg.data)
    backbone = instantiate(
        cfg.model, input_shape=datamodule.input_shape, num_classes=datamodule.num_classes,
        _convert_="all",
    )
    module = ClassifierModule(
        backbone, num_classes=datamodule.num_classes, lr=cfg.lr, seed=cfg.seed
    )
    epoch_clock = EpochClock(clock)
    ics = [instantiate(c) for c in cfg.callbacks.values()
           if c is not None and c._target_.startswith("normlab.ics.")]
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None]
    trainer = instantiate(
        cfg.trainer, max_epochs=epochs, logger=loggers, enable_checkpointing=False,
        enable_progress_bar=False, callbacks=[epoch_clock, *(ics if with_ics else [])],
    )
    trainer.fit(module, datamodule=datamodule)
    return epoch_clock.seconds


def _default_config(output_dir: Path) -> DictConfig:
    from hydra import compose, initialize_config_dir

    from normlab.config import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(
            "train",
            overrides=[f"paths.output_dir={output_dir}", f"paths.data_dir={output_dir / 'data'}"],
        )
