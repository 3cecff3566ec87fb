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

from torch import Tensor

from normlab.nn.running_stats import RunningStatsNorm

__all__ = ["MeanOnlyBatchNorm"]


class MeanOnlyBatchNorm(RunningStatsNorm):
    """Centering by the batch mean (running mean in evaluation), then gamma/beta.
    ``running_var`` stays 1: no scaling."""

    def __init__(
        self, num_features: int, momentum: float | None = 0.1, affine: bool = True
    ) -> None:
        super().__init__(num_features, momentum, affine)
        self.eps = 0.0

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            mean = x.mean(dim=(0, *range(2, x.dim())))
            self.running_mean.lerp_(mean.detach(), self.count_batch())
        else:
            mean = self.running_mean
        return self.affine(x - mean.view((1, -1) + (1,) * (x.dim() - 2)))

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}, affine={self.weight is not None}"
