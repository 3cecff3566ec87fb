"""IterNorm (Huang et al. 2019), ``norm=iternorm``: whitening of groups of channels by Newton's
iterations, the whitening norm of the lab.

Training, for each of ``groups`` groups of d = C/groups channels, with the group's activations
as a d x m matrix X (m = N * H * W):

    mu = mean of X over m;  Xc = X - mu;  Sigma = eps I + Xc Xc^T / m;  S = Sigma / tr(Sigma)
    P_0 = I;  P_k = (3 P_{k-1} - P_{k-1}^3 S) / 2   for k = 1..iterations
    W = P_T / sqrt(tr(Sigma))   (~ Sigma^{-1/2});   x_hat = W Xc;   y = gamma * x_hat + beta.

A few iterations only partly whiten (the paper's point: a controllable amount of whitening,
``iterations=5`` by default); ``groups`` = C is BN with a trace-normalized (not exact) scale. The
iteration is the paper's (uncoupled) one: it converges in exact arithmetic, but in float32 it
drifts away again after ~15 iterations -- keep ``iterations`` at the paper's 3-10.
Evaluation uses running estimates of mu and W (``momentum``; ``null`` = cumulative average) --
a fixed affine map, but across the channels of a group, not BN's per-channel one: it is not
folded (``foldable = False``). ``running_var`` keeps the running per-channel variance (the
diagonal of Sigma) for inspection and for the lab's running-statistics protocol (PreciseBN
recomputes every running estimate). ``groups`` larger than the channels is clamped, as GN's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab.nn.running_stats import RunningStatsNorm
from normlab.nn.torch_norms import group_count

__all__ = ["IterNorm"]


class IterNorm(RunningStatsNorm):
    """Group whitening by Newton iterations; (N, C) and (N, C, H, W) inputs."""

    foldable = False

    def __init__(
        self, num_features: int, groups: int = 2, iterations: int = 5, eps: float = 1e-5,
        momentum: float | None = 0.1, affine: bool = True,
    ) -> None:
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(
                f"iterations={iterations!r} is out of range: it must be an integer >= 1"
            )
        super().__init__(num_features, momentum, affine)
        self.groups = group_count(groups, num_features)
        self.iterations, self.eps = iterations, eps
        d = num_features // self.groups
        self.register_buffer("running_wm", torch.eye(d).repeat(self.groups, 1, 1))

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self.running_wm.copy_(torch.eye(self.running_wm.shape[-1]).expand_as(self.running_wm))

    def whitening(self, xc: Tensor) -> Tensor:
        """W (groups, d, d) for centred activations ``xc`` (groups, d, m)."""
        g, d, m = xc.shape
        eye = torch.eye(d, dtype=xc.dtype, device=xc.device).expand(g, d, d)
        sigma = torch.baddbmm(eye, xc, xc.transpose(1, 2), beta=self.eps, alpha=1.0 / m)
        trace = sigma.diagonal(dim1=1, dim2=2).sum(-1).view(g, 1, 1)
        s = sigma / trace
        p = eye
        for _ in range(self.iterations):
            p = 1.5 * p - 0.5 * torch.bmm(torch.bmm(torch.bmm(p, p), p), s)
        return p * trace.rsqrt()

    def forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        g, d = self.groups, c // self.groups
        # (N, C, *) -> (groups, d, N * HW)
        grouped = x.reshape(n, g, d, -1).permute(1, 2, 0, 3).reshape(g, d, -1)
        if self.training:
            mean = grouped.mean(-1, keepdim=True)
            xc = grouped - mean
            wm = self.whitening(xc)
            with torch.no_grad():
                factor = self.count_batch()
                m = xc.shape[-1]
                var = xc.square().sum(-1) / max(m - 1, 1)
                self.running_mean.lerp_(mean.detach().view(c), factor)
                self.running_var.lerp_(var.detach().view(c), factor)
                self.running_wm.lerp_(wm.detach(), factor)
        else:
            xc = grouped - self.running_mean.view(g, d, 1)
            wm = self.running_wm
        return self.affine(
            torch.bmm(wm, xc).reshape(g, d, n, -1).permute(2, 0, 1, 3).reshape(x.shape))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, groups={self.groups}, iterations={self.iterations}, "
                f"eps={self.eps}, momentum={self.momentum}, affine={self.weight is not None}")
