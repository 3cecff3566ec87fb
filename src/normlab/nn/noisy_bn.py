"""BatchNorm followed by time-varying random shift and scale: the "noisy" BN of Santurkar,
Tsipras, Ilyas & Madry (2018, "How Does Batch Normalization Help Optimization?", Algorithm 1),
built to show that BN still trains well when its output distribution is made *unstable*.

Noise parametrisation (every training forward pass t, independently per layer):

* per unit j (a feature, or a channel of a convolution):
  ``mu_j ~ Uniform(-n_mu, n_mu)`` and ``sigma_j ~ Uniform(1, n_sigma)``;
* per sample i and unit j (for convolutions every spatial position of every sample counts as
  a sample):  shift ``m_ij ~ Normal(mu_j, r_mu**2)`` and scale ``s_ij ~ Normal(sigma_j,
  r_sigma**2)`` -- ``r_mu`` and ``r_sigma`` are standard deviations;
* output ``y_ij = s_ij * bn(x)_ij + m_ij``, where ``bn`` is the full BN layer (with its
  gamma and beta).

Defaults are the paper's (appendix): n_mu = 0.5, n_sigma = 1.25, r_mu = r_sigma = 0.1. So the
shift has mean 0 and the scale mean (1 + n_sigma) / 2 over draws. The noise is drawn from
torch's global generator, in training only, and is a constant for backpropagation (the
gradient of ``y`` w.r.t. ``bn(x)`` is ``s``). Evaluation is plain BN; the running statistics
are BN's, computed from the noise-free batch statistics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normlab.nn.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d

__all__ = ["NoisyBatchNorm", "NoisyBatchNorm1d", "NoisyBatchNorm2d"]


class _NoisyBatchNorm:
    """Adds the noise after BN in training; mixed in before BatchNorm1d/2d."""

    def __init__(
        self,
        num_features: int,
        *args: Any,
        n_mu: float = 0.5,
        n_sigma: float = 1.25,
        r_mu: float = 0.1,
        r_sigma: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, *args, **kwargs)  # type: ignore[call-arg]
        for key, value, low in (("n_mu", n_mu, 0), ("n_sigma", n_sigma, 1), ("r_mu", r_mu, 0),
                                ("r_sigma", r_sigma, 0)):
            if value < low:
                raise ValueError(f"{key}={value} is out of range: noisy BN needs {key} >= {low}")
        self.n_mu, self.n_sigma, self.r_mu, self.r_sigma = n_mu, n_sigma, r_mu, r_sigma

    def forward(self, input: Tensor) -> Tensor:
        out = super().forward(input)  # type: ignore[misc]
        if not self.training:  # type: ignore[attr-defined]
            return out
        shift, scale = self.sample_noise(out)
        return torch.addcmul(shift, out, scale)

    def sample_noise(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """One draw of (shift m, scale s), each shaped like ``like`` (see the module docstring)."""
        channels = like.shape[1]
        per_unit = [channels] + [1] * (like.dim() - 2)  # broadcasts along axis 1
        options = {"dtype": like.dtype, "device": like.device}
        mu = torch.empty(per_unit, **options).uniform_(-self.n_mu, self.n_mu)
        sigma = torch.empty(per_unit, **options).uniform_(1.0, self.n_sigma)
        shift = torch.randn_like(like).mul_(self.r_mu).add_(mu)
        scale = torch.randn_like(like).mul_(self.r_sigma).add_(sigma)
        return shift, scale

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, n_mu={self.n_mu}, n_sigma={self.n_sigma}, "  # type: ignore[misc]
            f"r_mu={self.r_mu}, r_sigma={self.r_sigma}"
        )


class NoisyBatchNorm1d(_NoisyBatchNorm, BatchNorm1d):
    """Noisy BN per feature: input (N, C) or (N, C, L)."""


class NoisyBatchNorm2d(_NoisyBatchNorm, BatchNorm2d):
    """Noisy BN per channel of images (N, C, H, W)."""


class NoisyBatchNorm(_NoisyBatchNorm, BatchNorm):
    """For any of (N, C), (N, C, L) and (N, C, H, W): per feature or per channel, by input rank."""
