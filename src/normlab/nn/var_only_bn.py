"""Variance-only BN, ``norm=var_only_bn``: BN's scaling half alone -- no centering,

    training: y = x / sqrt(var_B + eps) * gamma + beta;  evaluation: running_var replaces var_B,

``var_B`` the channel's biased variance over the batch (N, H, W) about its batch mean (the very
statistic BN divides by); the mean itself is *not* subtracted. With ``norm=mean_only_bn`` first
(``affine=false``), the two halves composed are BN exactly. The running variance is updated as
BN's (unbiased, ``momentum``; ``null`` = cumulative average).

It keeps BN's running-statistics protocol, with ``running_mean`` fixed at 0: in evaluation it is
BN's affine map ``x / sqrt(running_var + eps) * gamma + beta``, so PreciseBN and folding apply.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab.nn.running_stats import RunningStatsNorm

__all__ = ["VarOnlyBatchNorm"]


class VarOnlyBatchNorm(RunningStatsNorm):
    """Scaling by the batch standard deviation (running one in evaluation), then gamma/beta.
    ``running_mean`` stays 0: no centering."""

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True,
    ) -> None:
        super().__init__(num_features, momentum, affine)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            var = x.var(dim=(0, *range(2, x.dim())), unbiased=False)
            n = x.numel() / x.shape[1]
            unbiased = var.detach() * (n / max(n - 1, 1))
            self.running_var.lerp_(unbiased, self.count_batch())
        else:
            var = self.running_var
        return self.affine(x * torch.rsqrt(var + self.eps).view((1, -1) + (1,) * (x.dim() - 2)))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.weight is not None}")
