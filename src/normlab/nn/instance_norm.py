"""Instance Norm (Ulyanov et al. 2016), ``norm=in``: each channel of each image normalized over
its own H x W positions, ``y = (x - mean_HW) / sqrt(var_HW + eps) * gamma + beta``.

torch's ``nn.InstanceNorm2d`` kernel, with ``affine=True`` by default here (torch's default is
False) so it has the per-channel gamma/beta every other norm of the lab has. No running
statistics: evaluation normalizes each image by its own statistics, as training does.

Image-only: on (N, C) features an instance is a single number per channel (its variance is 0),
so the forward refuses them in one line instead of returning zeros. A 1 x 1 map (VGG-small's
last layers on 8x8 digits) is normalized all the same -- to 0, so those layers output beta: torch
refuses that in training, the lab runs it (the batch-size experiment shows what it costs).
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
        if input.shape[2] * input.shape[3] == 1:
            # A 1x1 map (VGG-small's last layers on 8x8 digits): each channel of each image is
            # one number, normalized to 0, so the output is beta. torch refuses this in training;
            # the formula is well defined, and what it does to a network is worth seeing.
            shape = (1, -1, 1, 1)
            y = input - input  # 0, keeping the graph
            return y if self.weight is None else y * self.weight.view(shape) + self.bias.view(
                shape
            )
        return super().forward(input)
