"""RMS normalization of images over (C, H, W) with per-channel gamma, like GroupNorm(1, C).

torch's ``nn.RMSNorm(normalized_shape)`` normalizes over the trailing axes and learns one
gamma per normalized element, so over (C, H, W) it would need the image size and learn C*H*W
gains. Here the statistics are the same (the root mean square over C, H, W of one sample,
torch's ``F.rms_norm``), and gamma is per channel -- the affine every other image norm of
normlab has (BN, GroupNorm/LayerNorm-as-GroupNorm(1, C)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RMSNorm", "RMSNorm2d"]


class RMSNorm2d(nn.Module):
    """``x / sqrt(mean over (C, H, W) of x**2 + eps) * gamma[c]`` for inputs (N, C, H, W)."""

    batch_dependent = False

    def __init__(
        self, num_features: int, eps: float | None = None, elementwise_affine: bool = True
    ) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features)) if elementwise_affine else None

    def forward(self, input: Tensor) -> Tensor:
        out = F.rms_norm(input, input.shape[1:], eps=self.eps)
        return out if self.weight is None else out * self.weight.view(-1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}"


class RMSNorm(RMSNorm2d):
    """RMSNorm for (N, C) features (``nn.RMSNorm(C)``: over the features, gamma per feature) and
    (N, C, H, W) images (as RMSNorm2d: over C, H, W, gamma per channel); ``norm=rms``."""

    def __init__(self, num_features: int, eps: float | None = None, affine: bool = True) -> None:
        super().__init__(num_features, eps=eps, elementwise_affine=affine)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() == 2:
            return F.rms_norm(input, (self.num_features,), self.weight, self.eps)
        return super().forward(input)
