"""Mini-batches sliced from tensors that live in memory (or on the GPU), no DataLoader workers.

For small datasets a DataLoader's per-sample collation costs more than the model step itself.
Here an epoch is one seeded permutation and each batch is one index gather. The order depends
only on (seed, epoch): Lightning calls `set_epoch` through the `sampler` attribute, exactly as it
does for a DistributedSampler, so a resumed run sees the batches the straight run saw.
Under DDP each process takes its share of every *global* batch (rank::world_size), so the
global batch size and the data order are the same whatever the number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class MiniBatchStack:
    """K training mini-batches of B samples, one per optimizer step: `x` (K, B, ...), `y` (K, B).

    One Lightning batch carries K of them so Lightning's per-batch bookkeeping is paid once per
    K optimizer steps. Lightning moves it to the device through `to()` (`move_data_to_device`
    treats any object with a `to` method as one transferable leaf).
    """

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.y.shape[0]

    def minibatches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The `(x, y)` of each optimizer step, in order."""
        return zip(self.x.unbind(0), self.y.unbind(0), strict=True)

    def first(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mini-batch of the stack's first optimizer step."""
        return self.x[0], self.y[0]

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All samples as one batch: (K * B, ...) and (K * B,)."""
        return self.x.flatten(0, 1), self.y.flatten(0, 1)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MiniBatchStack:
        return MiniBatchStack(
            self.x.to(device, non_blocking=non_blocking),
            self.y.to(device, non_blocking=non_blocking),
        )


class TensorBatches:
    """Iterable of batches: `MiniBatchStack`s of `steps_per_batch` mini-batches in training,
    plain `(x, y)` of shapes (B, ...) and (B,) in evaluation."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        steps_per_batch: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.steps_per_batch = steps_per_batch if train else 1
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches) from load_state_dict
        self._yielded = 0
        self.sampler = self  # Lightning looks for `sampler.set_epoch`
        self.batch_sampler = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """Where training stands in the epoch (Lightning saves it in every checkpoint).

        `batches` counts the batches handed out; Lightning fetches one batch ahead, so
        `normlab.run.checkpoints.LoaderPosition` overwrites it with the batches trained."""
        return {"epoch": self.epoch, "batches": self._yielded, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """The next training epoch `state["epoch"]` starts after its first `state["batches"]`
        batches: a run resumed mid-epoch sees exactly the batches the straight run saw."""
        self._resume_at = (int(state["epoch"]), int(state["batches"]))

    @property
    def num_batches(self) -> int:
        """Mini-batches per epoch; training drops a last partial batch (BN needs >1 sample)."""
        n = len(self.y)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one training epoch: one per mini-batch (read by the module)."""
        return self.num_batches

    def __len__(self) -> int:
        return -(-self.num_batches // self.steps_per_batch)

    def epoch_order(self) -> torch.Tensor:
        if not self.train:
            return torch.arange(len(self.y))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.y), generator=generator)

    def __iter__(self) -> Iterator[MiniBatchStack | tuple[torch.Tensor, torch.Tensor]]:
        order = self.epoch_order()
        if self.train:
            skip, self._resume_at = self._resume_at, None
            start = skip[1] if skip is not None and skip[0] == self.epoch else 0
            self._yielded = start
            for index, batch in enumerate(self._train_batches(order)):
                if index >= start:
                    self._yielded += 1
                    yield batch
        else:
            for start in range(0, len(order), self.batch_size):
                yield self._gather(order[start : start + self.batch_size])

    def _train_batches(self, order: torch.Tensor) -> Iterator[MiniBatchStack]:
        per_stack = self.batch_size * self.steps_per_batch
        usable = order[: self.num_batches * self.batch_size]
        for start in range(0, len(usable), per_stack):
            chunk = usable[start : start + per_stack].view(-1, self.batch_size)
            yield MiniBatchStack(*self._gather(chunk))

    def _gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The rank's share of every batch: columns rank, rank + world_size, ...
        index = index[..., self.rank :: self.world_size].to(self.x.device)
        return self.x[index], self.y[index]
