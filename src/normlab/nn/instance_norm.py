"""Instance Norm (Ulyanov et al. 2016), ``norm=in``: each channel of each image normalized over
its own H x W positions, ``y = (x - mean_HW) / sqrt(var_HW + eps) * gamma + beta``.

torch's ``nn.InstanceNorm2d`` kernel, with ``affine=True`` by default here (torch's default is
False) so it has the per-channel gamma/beta every other norm of the lab has. No running
statistics: evaluation normalizes each image by its own statistics, as training does.

Image-only: on (N, C) features an instance is a single number per channel (its variance is 0),
so the forward refuses them in one line instead of returning zeros.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["InstanceNorm"]


class InstanceNorm(nn.InstanceNorm2d):
    """``nn.InstanceNorm2d(num_features, eps, affine=affine)``; (N, C, H, W) inputs only."""

    batch_dependent = False

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_features, eps=eps, affine=affine, track_running_stats=False)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 4:
            raise ValueError(
                "Instance Norm normalizes each channel over H, W of one image: it needs "
                f"(N, C, H, W) inputs, got {input.dim()}-D ones; use model=cnn or model=vgg"
            )
        return super().forward(input)
