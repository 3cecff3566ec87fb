"""Checkpoints that are never torn: written beside their target, then renamed over it.

Lightning's own `TorchCheckpointIO` writes through an fsspec transaction whose temporary file
lies under the system temp dir; when the output dir is on another filesystem the final step is a
copy, and a full disk leaves a truncated `last.ckpt` behind. `AtomicCheckpointIO` writes the
temporary file in the target's own directory and renames it (see `normlab.atomic`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from normlab.atomic import atomic_torch_save


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
