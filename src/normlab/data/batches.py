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

import torch


class TensorBatches:
    """Iterable of `(x, y)` batches; in training, of stacks of `steps_per_call` mini-batches.

    Training batches come as `x` of shape (K, B, ...) and `y` of shape (K, B) so the module can
    run K optimizer steps per Lightning step; evaluation batches are plain (B, ...) and (B,).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        steps_per_call: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.steps_per_call = steps_per_call if train else 1
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.sampler = self  # Lightning looks for `sampler.set_epoch`
        self.batch_sampler = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_batches(self) -> int:
        """Mini-batches per epoch; training drops a last partial batch (BN needs >1 sample)."""
        n = len(self.y)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __len__(self) -> int:
        return -(-self.num_batches // self.steps_per_call)

    def epoch_order(self) -> torch.Tensor:
        if not self.train:
            return torch.arange(len(self.y))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.y), generator=generator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.epoch_order()
        if self.train:
            yield from self._train_batches(order)
        else:
            for start in range(0, len(order), self.batch_size):
                yield self._gather(order[start : start + self.batch_size])

    def _train_batches(self, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        per_call = self.batch_size * self.steps_per_call
        usable = order[: self.num_batches * self.batch_size]
        for start in range(0, len(usable), per_call):
            chunk = usable[start : start + per_call].view(-1, self.batch_size)
            x, y = self._gather(chunk)
            yield x, y

    def _gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The rank's share of every batch: columns rank, rank + world_size, ...
        index = index[..., self.rank :: self.world_size].to(self.x.device)
        return self.x[index], self.y[index]
