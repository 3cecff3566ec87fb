"""One LightningDataModule for every dataset in the registry, serving in-memory tensor batches."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only

from normlab.data.batches import TensorBatches
from normlab.data.checks import check_splits
from normlab.data.registry import Splits, dataset_info

# Move a dataset onto the GPU once when it takes less than this share of free GPU memory.
_GPU_RESIDENT_SHARE = 0.25

log = logging.getLogger("normlab")


class NormLabDataModule(pl.LightningDataModule):
    """`name` picks the dataset (see `registry.DATASETS`); batches are tensor slices.

    Training batches are `MiniBatchStack`s of `steps_per_batch` mini-batches (optimizer steps per
    Lightning batch). `steps_per_call` is its old name, still accepted for one release.
    """

    def __init__(
        self,
        name: str = "digits",
        root: str | Path = "data",
        download: bool = False,
        batch_size: int = 32,
        eval_batch_size: int = 512,
        seed: int = 0,
        steps_per_batch: int = 1,
        steps_per_call: int | None = None,
    ) -> None:
        super().__init__()
        self.info = dataset_info(name)
        self.name = name
        self.root = Path(root)
        self.download = download
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        if steps_per_call is not None:
            _warn_deprecated_steps_per_call(steps_per_call)
            steps_per_batch = steps_per_call
        self.steps_per_batch = steps_per_batch
        self.splits: Splits | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.info.input_shape

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def load(self) -> Splits:
        """Load the splits once (also usable without a Trainer, e.g. in a notebook)."""
        if self.splits is None:
            splits = self.info.load(self.root, self.download)
            where = f"data.name={self.name} (paths.data_dir={self.root})"
            check_splits(splits, where=where, num_classes=self.num_classes,
                         batch_size=self.batch_size)  # bad data: one line, before training
            self.splits = splits
        return self.splits

    def setup(self, stage: str | None = None) -> None:
        splits = self.load()
        device = self._resident_device(splits)
        if device.type != "cpu":
            self.splits = Splits(
                *((x.to(device), y.to(device)) for x, y in (splits.train, splits.val, splits.test))
            )

    def _resident_device(self, splits: Splits) -> torch.device:
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        if device.type != "cuda":
            return torch.device("cpu")
        size = sum(t.nbytes for split in (splits.train, splits.val, splits.test) for t in split)
        free, _ = torch.cuda.mem_get_info(device)
        return device if size < _GPU_RESIDENT_SHARE * free else torch.device("cpu")

    def _batches(self, split: str, batch_size: int, train: bool) -> TensorBatches:
        x, y = getattr(self.load(), split)
        rank, world = (
            (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        )
        if train and batch_size % world:
            raise ValueError(
                f"data.batch_size={batch_size} is the global batch and must divide evenly over "
                f"{world} processes"
            )
        return TensorBatches(
            x,
            y,
            batch_size,
            train=train,
            seed=self.seed,
            steps_per_batch=self.steps_per_batch,
            rank=rank,
            world_size=world,
        )

    def train_dataloader(self) -> TensorBatches:
        return self._batches("train", self.batch_size, train=True)

    def val_dataloader(self) -> TensorBatches:
        return self._batches("val", self.eval_batch_size, train=False)

    def test_dataloader(self) -> TensorBatches:
        return self._batches("test", self.eval_batch_size, train=False)


@rank_zero_only
def _warn_deprecated_steps_per_call(value: int) -> None:
    log.warning(
        "data.steps_per_call=%s is deprecated: use data.steps_per_batch=%s (same meaning)",
        value,
        value,
    )
