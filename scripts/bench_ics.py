"""`python scripts/bench_ics.py`: what the ICS callbacks cost, as the epoch time of the default
run with them / without.

Both variants are the real default run (digits, MLP 32-32 with BN, batch 32, its number of
epochs, the cadence of `conf/callbacks/default.yaml`; one-time costs included). On a shared
machine the speed of a core drifts by tens of percent over seconds, more than the few percent
measured here, so the two runs train *at the same time* in two threads of this process and take
turns epoch by epoch (one waits while the other runs): each pair of epochs meets the same load.
The result is the median, over repeats, of (sum of epoch times with) / (sum without).
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import DictConfig, open_dict


class Baton:
    """Only its holder may run; handing it over wakes the other of two threads."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._holder = 0
        self._finished: set[int] = set()

    def take(self, me: int) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._holder == me)

    def hand_over(self, me: int, finished: bool = False) -> None:
        with self._condition:
            if finished:
                self._finished.add(me)
            if 1 - me not in self._finished:
                self._holder = 1 - me
            self._condition.notify_all()


class TakeTurns(pl.Callback):
    """Times each training epoch (validation included) and passes the baton between epochs."""

    def __init__(self, baton: Baton, me: int, clock: Callable[[], float]) -> None:
        self.baton, self.me, self.clock = baton, me, clock
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.seconds:
            self.baton.hand_over(self.me)
            self.baton.take(self.me)
        self._start = self.clock()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(self.clock() - self._start)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.baton.hand_over(self.me, finished=True)


def logging_overhead(
    quick: bool = False,
    repeats: int | None = None,
    wall: bool = False,
    overrides: Sequence[str] = (),
) -> float:
    """Epoch time of the default run with its ICS callbacks / without them (1.0 = free).

    CPU time of this process by default (the waiting thread uses none; TensorBoard's writer
    thread counts); `wall=True` measures wall-clock time instead. `overrides` change the
    default config, e.g. `["callbacks.ics.every_n_steps=50"]`.
    """
    repeats = repeats or (3 if quick else 9)
    clock = time.perf_counter if wall else time.process_time
    with tempfile.TemporaryDirectory(prefix="normlab-ics-bench-") as tmp:
        cfg = _default_config(Path(tmp), overrides)
        _epoch_pair(cfg, clock, ics_first=True, epochs=1)  # warm-up: imports, data, allocations
        ratios = []
        for repeat in range(repeats):
            with_ics, without = _epoch_pair(cfg, clock, ics_first=repeat % 2 == 0)
            ratios.append(sum(with_ics) / sum(without))
    return statistics.median(ratios)


def _epoch_pair(
    cfg: DictConfig, clock: Callable[[], float], ics_first: bool, epochs: int | None = None
) -> tuple[list[float], list[float]]:
    """Epoch times (with ICS, without) of two runs that take turns epoch by epoch."""
    baton = Baton()
    turns, threads, errors = {}, [], []
    for me, with_ics in enumerate((ics_first, not ics_first)):
        turns[with_ics] = TakeTurns(baton, me, clock)
        fit = _trainer_fit(cfg, with_ics, turns[with_ics], epochs or cfg.trainer.max_epochs)
        threads.append(threading.Thread(target=_when_holding, args=(baton, me, fit, errors)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return turns[True].seconds, turns[False].seconds


def _when_holding(
    baton: Baton, me: int, run: Callable[[], None], errors: list[BaseException]
) -> None:
    baton.take(me)
    try:
        run()
    except BaseException as error:  # re-raised by the main thread
        errors.append(error)
    finally:
        baton.hand_over(me, finished=True)  # never leave the other thread waiting


def _trainer_fit(
    cfg: DictConfig, with_ics: bool, timer: pl.Callback, epochs: int
) -> Callable[[], None]:
    from hydra.utils import instantiate

    from normlab.train import build_module, build_trainer

    pl.seed_everything(cfg.seed, verbose=False)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule)
    trainer, _ = build_trainer(_variant(cfg, with_ics, epochs), extra_callbacks=[timer])
    return lambda: trainer.fit(module, datamodule=datamodule)


def _variant(cfg: DictConfig, with_ics: bool, epochs: int) -> DictConfig:
    """The run's config for `epochs` epochs, its ICS callbacks only (or no callbacks at all)."""
    variant = cfg.copy()
    ics = {
        name: c for name, c in (cfg.callbacks or {}).items()
        if c is not None and with_ics and c._target_.startswith("normlab.callbacks.")
    }
    with open_dict(variant):
        variant.callbacks = ics
        variant.trainer.max_epochs = epochs
        variant.trainer.enable_checkpointing = False
        variant.trainer.enable_progress_bar = False
    return variant


def _default_config(output_dir: Path, overrides: Sequence[str] = ()) -> DictConfig:
    from hydra import compose, initialize_config_dir

    from normlab.config import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                f"paths.output_dir={output_dir}",
                f"paths.data_dir={output_dir / 'data'}",
                *overrides,
            ],
        )


if __name__ == "__main__":
    print(f"ics_logging_overhead: {logging_overhead():.3f}")
