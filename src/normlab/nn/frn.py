"""Filter Response Normalization + TLU (Singh & Krishnan 2020), ``norm=frn``.

Per sample and channel, no centering and no batch:

    nu2 = mean over H, W of x^2;   x_hat = x / sqrt(nu2 + eps);   y = gamma * x_hat + beta;
    z = max(y, tau)                                              (TLU, learned threshold tau)

``learned_eps=True`` uses ``eps + |eps_l|`` with a learned ``eps_l`` (initialised to 0; the
paper's fix for small feature maps). FRN carries its own activation (TLU): the lab's activation
still follows it, as with every other norm (with ReLU after it, ``relu(max(y, tau))``;
``tlu=False`` drops the TLU).

(N, C) features are 1 x 1 maps: ``nu2 = x^2`` and FRN is ``x / sqrt(x^2 + eps)`` -- nearly
sign(x); the paper's case for ``learned_eps``. It runs on the MLP, but expect it to hurt there.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FilterResponseNorm"]


class FilterResponseNorm(nn.Module):
    """FRN + TLU for (N, C) and (N, C, H, W) inputs."""

    batch_dependent = False

    def __init__(
        self, num_features: int, eps: float = 1e-6, learned_eps: bool = False, tlu: bool = True
    ) -> None:
        super().__init__()
        if not eps >= 0:
            raise ValueError(f"eps={eps} is out of range: it must be >= 0")
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.tau = nn.Parameter(torch.zeros(num_features)) if tlu else None
        self.eps_l = nn.Parameter(torch.zeros(num_features)) if learned_eps else None

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        nu2 = x.square().mean(dim=tuple(range(2, x.dim())), keepdim=True) if x.dim() > 2 \
            else x.square()
        eps = self.eps if self.eps_l is None else self.eps + self.eps_l.abs().view(shape)
        y = x * torch.rsqrt(nu2 + eps) * self.weight.view(shape) + self.bias.view(shape)
        return y if self.tau is None else torch.maximum(y, self.tau.view(shape))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, learned_eps={self.eps_l is not None}, "
                f"tlu={self.tau is not None}")
