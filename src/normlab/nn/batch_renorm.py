"""Batch Renormalization (Ioffe, 2017): BN whose training output already uses the running
statistics, through a clipped per-channel correction.

Training, per channel (``sigma_B = sqrt(var_B + eps)``, ``sigma = sqrt(running_var + eps)``):

    r = clip(sigma_B / sigma, 1 / r_max, r_max)        d = clip((mu_B - running_mean) / sigma,
                                                                -d_max, d_max)
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

with ``r`` and ``d`` treated as constants by backpropagation. With ``r = sigma_B / sigma`` and
``d = (mu_B - running_mean) / sigma`` unclipped, ``y`` is exactly the evaluation output; the
clips keep training stable while the running statistics are still poor. Evaluation is BN's.
The running statistics move as BN's (``momentum``); ``r_max=1, d_max=0`` is plain BN.

Warm-up schedule, the paper's (Sec. 4): ``r_max = 1, d_max = 0`` (plain BN) for the first
``relax_start`` training steps, then raised linearly to ``r_max`` at ``r_max_full_at`` steps and
to ``d_max`` at ``d_max_full_at`` steps: 5000, 40000 and 25000 steps, r_max 3, d_max 5.
Steps are training forward passes, counted by the BN counter ``num_batches_tracked``.

The arithmetic is our BatchNorm's (``normlab.nn.batchnorm``): only the limits are added here.
"""

from __future__ import annotations

from typing import Any

from normlab.nn.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d

__all__ = ["BatchRenorm", "BatchRenorm1d", "BatchRenorm2d"]


class _BatchRenorm:
    """The schedule of ``(r_max, d_max)``; mixed in before BatchNorm1d/2d."""

    def __init__(
        self,
        num_features: int,
        *args: Any,
        r_max: float = 3.0,
        d_max: float = 5.0,
        relax_start: int = 5000,
        r_max_full_at: int = 40000,
        d_max_full_at: int = 25000,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, *args, **kwargs)  # type: ignore[call-arg]
        if r_max < 1:
            raise ValueError(f"r_max={r_max} is out of range: batch renorm needs r_max >= 1")
        if d_max < 0:
            raise ValueError(f"d_max={d_max} is out of range: batch renorm needs d_max >= 0")
        if not self.track_running_stats:  # type: ignore[attr-defined]
            raise ValueError(
                "track_running_stats=False: batch renorm corrects towards the running "
                "statistics; keep them (true)"
            )
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.relax_start = relax_start
        self.r_max_full_at, self.d_max_full_at = r_max_full_at, d_max_full_at

    def limits_at(self, step: int) -> tuple[float, float]:
        """``(r_max, d_max)`` in force at training step ``step`` (1-based)."""
        return (
            1.0 + (self.r_max - 1.0) * _ramp(step, self.relax_start, self.r_max_full_at),
            self.d_max * _ramp(step, self.relax_start, self.d_max_full_at),
        )

    def _renorm_limits(self) -> tuple[float, float] | None:
        # forward() has already counted this batch in num_batches_tracked.
        limits = self.limits_at(int(self.num_batches_tracked))  # type: ignore[attr-defined]
        return None if limits == (1.0, 0.0) else limits  # r = 1, d = 0: exactly plain BN

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "  # type: ignore[misc]
            f"relax_start={self.relax_start}, r_max_full_at={self.r_max_full_at}, "
            f"d_max_full_at={self.d_max_full_at}"
        )


def _ramp(step: int, start: int, end: int) -> float:
    """0 until ``start``, then linearly to 1 at ``end`` (a step at ``end <= start``)."""
    if step <= start:
        return 0.0
    if end <= start:
        return 1.0
    return min(1.0, (step - start) / (end - start))


class BatchRenorm1d(_BatchRenorm, BatchNorm1d):
    """Batch Renormalization per feature: input (N, C) or (N, C, L)."""


class BatchRenorm2d(_BatchRenorm, BatchNorm2d):
    """Batch Renormalization per channel of images (N, C, H, W)."""


class BatchRenorm(_BatchRenorm, BatchNorm):
    """For any of (N, C), (N, C, L) and (N, C, H, W): per feature or per channel, by input rank."""
