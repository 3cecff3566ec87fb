"""torch's BatchNorm, LayerNorm and GroupNorm as norms of the lab: ``Class(num_features,
**options)``, one class for both (N, C) features and (N, C, H, W) images.

torch has separate classes per input rank (``BatchNorm1d``/``BatchNorm2d``) or per shape
(``LayerNorm(normalized_shape)``); a backbone only knows its feature count. These thin classes
dispatch on the input instead, with torch's kernels and torch's parameter and buffer names (a
checkpoint of ``nn.BatchNorm1d`` loads into ``TorchBatchNorm``). Options are the same for every
norm of the lab (``eps``, ``affine``), whatever torch calls them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["GroupNorm", "LayerNorm", "TorchBatchNorm", "group_count"]


class TorchBatchNorm(_BatchNorm):
    """torch's batch norm for (N, C), (N, C, L) or (N, C, H, W): ``nn.BatchNorm1d`` on features,
    ``nn.BatchNorm2d`` on images, in one class (the same kernel, options and state_dict)."""

    batch_dependent = True

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3, 4):
            raise ValueError(f"expected 2D, 3D or 4D input (got {input.dim()}D input)")


class LayerNorm(nn.Module):
    """LayerNorm: statistics over the features of one sample.

    (N, C): ``nn.LayerNorm(C)``. (N, C, H, W): over C, H and W, as ``nn.GroupNorm(1, C)`` -- the
    statistics of ``LayerNorm([C, H, W])`` but one gamma/beta per channel (like BN) instead of
    per C*H*W element, so it does not depend on the image size.
    """

    batch_dependent = False

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() == 2:
            return F.layer_norm(input, (self.num_features,), self.weight, self.bias, self.eps)
        return F.group_norm(input, 1, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}"


def group_count(groups: int, channels: int) -> int:
    """`groups` clamped to `channels`; ValueError naming the valid counts if it does not divide."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups={groups!r} is out of range: it must be an integer >= 1")
    count = min(groups, channels)
    if channels % count != 0:
        valid = [d for d in range(1, channels + 1) if channels % d == 0]
        raise ValueError(
            f"groups={groups} does not divide {channels} channels; "
            f"valid: {', '.join(map(str, valid))}"
        )
    return count


class GroupNorm(nn.GroupNorm):
    """GroupNorm over groups of channels (and H, W) of one sample; in an MLP, groups of features.

    ``groups`` larger than the channel count is clamped to it (a narrow layer gets one channel
    per group); one that does not divide the channels is an error naming the valid counts.
    """

    batch_dependent = False

    def __init__(
        self, num_features: int, groups: int = 8, eps: float = 1e-5, affine: bool = True
    ) -> None:
        super().__init__(group_count(groups, num_features), num_features, eps, affine)

