"""Switchable Normalization (Luo et al. 2019), ``norm=switchable``: a learned mixture of
Instance, Layer and Batch Norm statistics,

    mean = sum_k softmax(a)_k mu_k,   var = sum_k softmax(b)_k var_k,   k in {in, ln, bn},
    y = (x - mean) / sqrt(var + eps) * gamma + beta,

``mu_in, var_in`` over H, W of one sample's channel, ``ln`` over C, H, W of one sample, ``bn``
over N, H, W of one channel (all biased variances; ``ln`` and ``bn`` computed from the ``in``
moments, as the paper's code does). Separate learned logits ``a`` (mean) and ``b`` (variance),
initialised equal. In evaluation running estimates replace the BN statistics (updated as BN's;
``momentum=null`` = cumulative average), the IN/LN ones are still each sample's own.

On (N, C) features an instance is one number per channel (IN's variance is 0): there the mixture
is over LN and BN only (the paper's SwitchNorm1d); IN's logits are then unused.

``scalars()`` returns the current mixture weights (``mean_in``, ..., ``var_bn``): the ICS callback
logs them as ``norm/<layer>/<name>`` so one can watch what it picks. It carries BN's running
statistics but is not BN's affine map in evaluation (``foldable = False``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab.nn.running_stats import RunningStatsNorm

__all__ = ["SwitchableNorm"]

KINDS = ("in", "ln", "bn")


class SwitchableNorm(RunningStatsNorm):
    """Softmax mixture of IN, LN and BN means and variances; (N, C) and (N, C, H, W) inputs."""

    foldable = False

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True,
    ) -> None:
        super().__init__(num_features, momentum, affine)
        self.eps = eps
        self.mean_logits = nn.Parameter(torch.ones(len(KINDS)))
        self.var_logits = nn.Parameter(torch.ones(len(KINDS)))

    def mixture(self, images: bool = True) -> tuple[Tensor, Tensor]:
        """Softmax weights (mean, variance) over ``KINDS`` (IN's weight 0 without H, W)."""
        used = slice(0, 3) if images else slice(1, 3)
        weights = []
        for logits in (self.mean_logits, self.var_logits):
            w = torch.zeros_like(logits)
            w = w.index_put((torch.arange(3)[used],), torch.softmax(logits[used], 0))
            weights.append(w)
        return weights[0], weights[1]

    def scalars(self) -> dict[str, float]:
        """The mixture weights now, ``{"mean_in": ..., "var_bn": ...}`` (image inputs)."""
        with torch.no_grad():
            mean_w, var_w = self.mixture(images=True)
        return {
            **{f"mean_{k}": float(w) for k, w in zip(KINDS, mean_w, strict=True)},
            **{f"var_{k}": float(w) for k, w in zip(KINDS, var_w, strict=True)},
        }

    def forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        flat = x.reshape(n, c, -1)  # (N, C, HW); HW = 1 for features
        mean_in = flat.mean(-1, keepdim=True)
        sq_in = flat.square().mean(-1, keepdim=True)
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = sq_in.mean(1, keepdim=True) - mean_ln.square()
        if self.training:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = sq_in.mean(0, keepdim=True) - mean_bn.square()
            with torch.no_grad():
                factor = self.count_batch()
                m = n * flat.shape[-1]
                self.running_mean.lerp_(mean_bn.view(c), factor)
                self.running_var.lerp_(var_bn.view(c) * (m / max(m - 1, 1)), factor)
        else:
            mean_bn = self.running_mean.view(1, c, 1)
            var_bn = self.running_var.view(1, c, 1)
        mean_w, var_w = self.mixture(images=x.dim() > 2)
        mean = mean_w[0] * mean_in + mean_w[1] * mean_ln + mean_w[2] * mean_bn
        var_in = sq_in - mean_in.square()
        var = var_w[0] * var_in + var_w[1] * var_ln + var_w[2] * var_bn
        y = (flat - mean) * torch.rsqrt(var.clamp_min(0) + self.eps)
        return self.affine(y).reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.weight is not None}")
