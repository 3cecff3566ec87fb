"""EvoNorm-S0 (Liu et al. 2020), ``norm=evonorm_s0``: a batch-independent normalization-activation
layer found by search,

    y = x * sigmoid(v * x) / group_std(x) * gamma + beta,

``group_std`` the standard deviation over each group of C/groups channels (and H, W) of one
sample, ``sqrt(var + eps)`` -- GroupNorm's statistic, without centering the numerator. ``v`` is
learned per channel (initialised to 1), so like FRN it carries its own (swish-like) activation.
``groups`` larger than the channel count is clamped to it, as in ``norm=gn``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab.nn.torch_norms import group_count

__all__ = ["EvoNormS0"]


class EvoNormS0(nn.Module):
    """EvoNorm-S0 for (N, C) and (N, C, H, W) inputs."""

    batch_dependent = False

    def __init__(self, num_features: int, groups: int = 8, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.groups = group_count(groups, num_features)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v = nn.Parameter(torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        grouped = x.reshape(x.shape[0], self.groups, -1)
        std = grouped.var(dim=2, unbiased=False, keepdim=True).add(self.eps).sqrt()
        std = std.expand(grouped.shape).reshape(x.shape)
        y = x * torch.sigmoid(x * self.v.view(shape)) / std
        return y * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, eps={self.eps}"
