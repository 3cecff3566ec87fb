"""Mean-only BN (Salimans & Kingma 2016), ``norm=mean_only_bn``: BN's centering half alone,

    training: y = (x - mu_B) * gamma + beta;   evaluation: y = (x - running_mean) * gamma + beta,

``mu_B`` the channel's mean over the batch (N, H, W). No division: the scale of x passes
through. With ``norm=var_only_bn`` (the other half) the two halves composed are BN exactly.

It keeps BN's running-statistics protocol (``running_mean``, ``running_var``,
``num_batches_tracked``, ``momentum``, ``eps``, ``reset_running_stats``) so PreciseBN and folding
treat it as the BN-shaped affine map it is in evaluation: ``running_var`` stays 1 and ``eps`` is
0, so BN's fold formula ``gamma / sqrt(running_var + eps)`` is exactly ``gamma``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MeanOnlyBatchNorm"]


class MeanOnlyBatchNorm(nn.Module):
    """Centering by the batch mean (running mean in evaluation), then gamma/beta."""

    batch_dependent = True

    def __init__(
        self, num_features: int, momentum: float | None = 0.1, affine: bool = True
    ) -> None:
        super().__init__()
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum={momentum} is out of range: it must be in [0, 1] or null")
        self.num_features, self.momentum, self.eps = num_features, momentum, 0.0
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))  # fixed: no scaling
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            mean = x.mean(dim=(0, *range(2, x.dim())))
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None \
                    else self.momentum
                self.running_mean.lerp_(mean.detach(), factor)
        else:
            mean = self.running_mean
        y = x - mean.view(shape)
        if self.weight is None:
            return y
        return y * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}, affine={self.weight is not None}"
