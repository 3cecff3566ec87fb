"""Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017): BN statistics over virtual
("ghost") batches of ``ghost_batch_size`` samples.

In training the batch of N samples is cut, in order, into N / ghost_batch_size ghost batches,
and each is batch-normalized with its own mean and variance -- the noise of small-batch BN at
the throughput of a large batch. Each ghost batch also moves the running statistics, exactly
as a BN call on it would (so ``num_batches_tracked`` counts ghost batches). Evaluation is BN's.
A batch that is not a multiple of ``ghost_batch_size`` is refused with a clear error; a single
ghost batch (N == ghost_batch_size) is plain BN.

The arithmetic is our BatchNorm's (``normlab.nn.batchnorm``): this only slices the batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normlab.nn.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d

__all__ = ["GhostBatchNorm", "GhostBatchNorm1d", "GhostBatchNorm2d"]


class _GhostBatchNorm:
    """Splits training batches into ghost batches; mixed in before BatchNorm1d/2d."""

    def __init__(
        self, num_features: int, *args: Any, ghost_batch_size: int = 16, **kwargs: Any
    ) -> None:
        super().__init__(num_features, *args, **kwargs)  # type: ignore[call-arg]
        if ghost_batch_size < 2:
            raise ValueError(
                f"ghost_batch_size={ghost_batch_size} is out of range: it must be >= 2"
            )
        self.ghost_batch_size = ghost_batch_size

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:  # type: ignore[attr-defined]
            return super().forward(input)  # type: ignore[misc]
        size = self.ghost_batch_size
        normalize = super().forward  # type: ignore[misc]
        if input.shape[0] % size != 0:
            batch = input.shape[0]
            valid = [d for d in range(2, batch + 1) if batch % d == 0]
            raise ValueError(
                f"ghost_batch_size={size} does not divide the training batch of {batch} samples "
                f"(per process); valid: {', '.join(map(str, valid))}"
            )
        if input.shape[0] == size:
            return normalize(input)
        return torch.cat([normalize(ghost) for ghost in input.split(size)])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"  # type: ignore[misc]


class GhostBatchNorm1d(_GhostBatchNorm, BatchNorm1d):
    """Ghost BN per feature: input (N, C) or (N, C, L)."""


class GhostBatchNorm2d(_GhostBatchNorm, BatchNorm2d):
    """Ghost BN per channel of images (N, C, H, W)."""


class GhostBatchNorm(_GhostBatchNorm, BatchNorm):
    """For any of (N, C), (N, C, L) and (N, C, H, W): per feature or per channel, by input rank."""
