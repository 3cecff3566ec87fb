"""What the batch-statistics norms written from scratch share (``mean_only_bn``, ``var_only_bn``,
``switchable``, ``iternorm``): BN's running-statistics protocol and its per-channel gamma/beta.

The buffers are torch BatchNorm's (``running_mean``, ``running_var``, ``num_batches_tracked``),
so PreciseBN and the traits in ``normlab.nn.traits`` see them as BN's; ``momentum=None`` is BN's
cumulative average.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RunningStatsNorm"]


class RunningStatsNorm(nn.Module):
    """gamma/beta (``affine``) and BN's running-statistics buffers, for subclasses to update."""

    batch_dependent = True

    def __init__(self, num_features: int, momentum: float | None = 0.1, affine: bool = True):
        super().__init__()
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum={momentum} is out of range: it must be in [0, 1] or null")
        self.num_features, self.momentum = num_features, momentum
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    @torch.no_grad()
    def count_batch(self) -> float:
        """Count one training batch; the weight of its statistics in the running ones."""
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    def affine(self, y: Tensor) -> Tensor:
        """``y * gamma + beta`` per channel (axis 1), or ``y`` without ``affine``."""
        if self.weight is None:
            return y
        shape = (1, -1) + (1,) * (y.dim() - 2)
        return y * self.weight.view(shape) + self.bias.view(shape)
