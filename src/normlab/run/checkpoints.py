"""Checkpoints that are never torn or lost, and say what they were trained with.

`AtomicModelCheckpoint`/`AtomicCheckpointIO`: written beside their target, then renamed over it.
`StopOnSignal`: on SIGTERM/SIGINT, save last.ckpt at the end of the current step and stop
(see `normlab.run.signals`). `StoreConfig`: the run's config inside every checkpoint
(`normlab.run.resume`).

Lightning's own `TorchCheckpointIO` writes through an fsspec transaction whose temporary file
lies under the system temp dir; when the output dir is on another filesystem the final step is a
copy, and a full disk leaves a truncated `last.ckpt` behind. `AtomicCheckpointIO` writes the
temporary file in the target's own directory and renames it (see `normlab.run.atomic`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig

from normlab.run import resume, signals
from normlab.run.atomic import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose saves are atomic in the target's directory."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(checkpoint, path)


class AtomicModelCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` that makes the trainer save through `AtomicCheckpointIO`.

    The plugin is installed when the trainer sets up, so every save of the run (this callback's,
    and `trainer.save_checkpoint` calls such as the interrupt checkpoint) is atomic.
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()


class StopOnSignal(Callback):
    """At the end of each Lightning step, if a signal came: save last.ckpt and stop the run."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        signals.watch_steps(True)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.world_size > 1:  # a DDP process; after Lightning's own handler (registered
            signals.install()  # late in fit, it broadcasts from inside the handler: deadlocks)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            signals.watch_steps(False)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        signum = signals.stop_requested()
        if trainer.world_size > 1:  # every DDP process stops after the same step
            stop = trainer.strategy.reduce_boolean_decision(signum is not None, all=False)
            signum = (signum or signals.signal.SIGTERM) if stop else None
        if signum is not None:
            self._save(trainer)
            signals.requeue_after_warning(signum)
            raise signals.stop_run(signum, ddp=trainer.world_size > 1)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        # Lightning stopped at one of its own check points (e.g. during validation)
        stopped = isinstance(exception, SIGTERMException | KeyboardInterrupt)
        if stopped and not signals.has_saved():
            self._save(trainer)

    @staticmethod
    def _save(trainer: Any) -> None:
        callback = trainer.checkpoint_callback
        folder = callback.dirpath if callback else Path(trainer.default_root_dir, "checkpoints")
        path = Path(folder) / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)
        signals.checkpoint_saved(path, trainer.global_step)


class LoaderPosition(Callback):
    """Record in each checkpoint how many training batches of the epoch were trained.

    A loader's own `state_dict()` counts the batches it handed out, one more than trained while
    Lightning prefetches; a resumed run must start right after the last trained batch.
    """

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        try:
            states = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        except (KeyError, TypeError):
            return
        trained = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        for state in states:
            if isinstance(state, dict) and "batches" in state:
                state["batches"] = trained


class StoreConfig(Callback):
    """Save the run's composed config (resolved, plain containers) in each checkpoint."""

    def __init__(self, cfg: DictConfig) -> None:
        self.config = resume.plain_config(cfg)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[resume.CONFIG_KEY] = self.config


def safety_callbacks(cfg: DictConfig) -> list[Callback]:
    """What every run gets: save-and-stop on SIGTERM/SIGINT, the config inside every checkpoint."""
    return [StopOnSignal(), StoreConfig(cfg), LoaderPosition()]
