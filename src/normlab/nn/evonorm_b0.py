"""EvoNorm-B0 (Liu et al. 2020), ``norm=evonorm_b0``: a batch-dependent normalization-activation
layer found by search,

    y = x / max(sqrt(var_B + eps), v * x + sqrt(var_I + eps)) * gamma + beta,

``var_B`` the biased variance of the channel over the batch (N, H, W), ``var_I`` that of one
sample's channel over H, W (0 on (N, C) features, which are 1 x 1 maps), ``v`` learned per
channel (initialised to 1). In evaluation a running ``var_B`` replaces the batch's (updated as
torch's BN does: ``momentum``, unbiased), so it needs no running mean; there is no centering.
It is not BN's affine map in evaluation (the max with the per-sample term): nothing to fold.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["EvoNormB0"]


class EvoNormB0(nn.Module):
    """EvoNorm-B0 for (N, C) and (N, C, H, W) inputs."""

    batch_dependent = True

    def __init__(self, num_features: int, eps: float = 1e-3, momentum: float = 0.1) -> None:
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum={momentum} is out of range: it must be in (0, 1]")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v = nn.Parameter(torch.ones(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        spatial = tuple(range(2, x.dim()))
        if self.training:
            var = x.var(dim=(0, *spatial), unbiased=False)
            n = x.numel() / x.shape[1]
            with torch.no_grad():
                unbiased = var.detach() * (n / max(n - 1, 1))
                self.running_var.lerp_(unbiased, self.momentum)
        else:
            var = self.running_var
        left = var.add(self.eps).sqrt().view(shape)
        var_i = x.var(dim=spatial, unbiased=False, keepdim=True) if spatial else torch.zeros_like(x)
        right = x * self.v.view(shape) + var_i.add(self.eps).sqrt()
        y = x / torch.maximum(left.expand_as(x), right)
        return y * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"
