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
from torch import Tensor, nn

__all__ = ["VarOnlyBatchNorm"]


class VarOnlyBatchNorm(nn.Module):
    """Scaling by the batch standard deviation (running one in evaluation), then gamma/beta."""

    batch_dependent = True

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True,
    ) -> None:
        super().__init__()
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum={momentum} is out of range: it must be in [0, 1] or null")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))  # fixed: no centering
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            var = x.var(dim=(0, *range(2, x.dim())), unbiased=False)
            n = x.numel() / x.shape[1]
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None \
                    else self.momentum
                self.running_var.lerp_(var.detach() * (n / max(n - 1, 1)), factor)
        else:
            var = self.running_var
        y = x * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is None:
            return y
        return y * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.weight is not None}")
