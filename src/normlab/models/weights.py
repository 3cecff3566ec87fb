"""Weight-side normalization, the ``weights`` config group: applied to every Linear/Conv of a
built backbone, whatever its ``norm`` (``norm=gn weights=standardized`` is BiT's GN+WS).

Each choice names a function ``apply(model, **options)`` by ``_target_``; it changes the model
in place through torch's parametrizations, so the trained parameters are the raw ones and every
forward pass sees the normalized weight:

* ``plain`` -- nothing (the default).
* ``standardized`` -- Weight Standardization (Qiao et al. 2019): each output unit's / channel's
  weights standardized over its fan-in, ``W_hat = (W - mean(W)) / sqrt(var(W) + eps)``
  (biased variance). On the hidden layers; the classifier head too with ``head=true``.
* ``weight_norm`` -- Weight Normalization (Salimans & Kingma 2016), torch's
  ``parametrizations.weight_norm``: ``W = g * v / ||v||`` per output unit, ``g`` initialised to
  ``||W||``, so the network computes the same function at initialisation. Head included.

Nothing here draws random numbers: the same seed still gives the same initial weights for every
``norm`` and ``weights``. Folding (``normlab.nn.fold``) bakes the effective weights in before it
folds; the ICS probes read the effective weight (histograms) and the raw parameter (gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["WeightStandardization", "plain", "standardized", "weight_norm"]

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _layers(model: nn.Module, head: bool) -> list[nn.Module]:
    """The Linear/Conv layers of `model`; without its classifier ``head`` unless `head`."""
    skip = None if head else getattr(model, "head", None)
    return [m for m in model.modules() if isinstance(m, WEIGHT_LAYERS) and m is not skip]


def plain(model: nn.Module) -> None:
    """No weight-side normalization."""


class WeightStandardization(nn.Module):
    """The parametrization ``W -> (W - mean) / sqrt(var + eps)`` over each output's fan-in."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, weight: Tensor) -> Tensor:
        flat = weight.reshape(weight.shape[0], -1)
        var, mean = torch.var_mean(flat, dim=1, unbiased=False, keepdim=True)
        return ((flat - mean) * torch.rsqrt(var + self.eps)).reshape(weight.shape)


def standardized(model: nn.Module, eps: float = 1e-5, head: bool = False) -> None:
    """Weight Standardization on every Linear/Conv (the head only with `head`)."""
    if not eps > 0:
        raise ValueError(f"eps={eps} is out of range: it must be > 0")
    for layer in _layers(model, head):
        parametrize.register_parametrization(layer, "weight", WeightStandardization(eps))


def weight_norm(model: nn.Module, head: bool = True) -> None:
    """torch's weight normalization (``g * v / ||v||``, per output) on every Linear/Conv."""
    for layer in _layers(model, head):
        nn.utils.parametrizations.weight_norm(layer, "weight", dim=0)
