"""Summary statistics of one activation tensor: the BN paper's percentiles, mean and std."""

from __future__ import annotations

import torch

PERCENTILES = {"p15": 0.15, "p50": 0.50, "p85": 0.85}
# torch.quantile refuses inputs above 2**24 elements.
QUANTILE_LIMIT = 2**24


def flat_sample(x: torch.Tensor, limit: int = QUANTILE_LIMIT) -> torch.Tensor:
    """All values as float32, or an evenly strided subset of at most `limit` of them."""
    flat = x.detach().reshape(-1).float()
    stride = -(-flat.numel() // limit)
    return flat[::stride] if stride > 1 else flat


def distribution_stats(x: torch.Tensor, limit: int = QUANTILE_LIMIT) -> dict[str, float]:
    """`{"p15", "p50", "p85", "mean", "std"}` of all values of `x` (percentiles on a sample)."""
    flat = x.detach().reshape(-1).float()
    sample = flat_sample(flat, limit)
    q = torch.tensor(list(PERCENTILES.values()), dtype=sample.dtype, device=sample.device)
    std, mean = torch.std_mean(flat)
    values = torch.cat([torch.quantile(sample, q), mean[None], std[None]]).tolist()  # one sync
    return dict(zip([*PERCENTILES, "mean", "std"], values, strict=True))
