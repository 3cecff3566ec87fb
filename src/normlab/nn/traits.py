"""What the lab needs to know about a norm layer, read from the layer itself.

A norm is any ``nn.Module`` built as ``Class(num_features, **options)``. The instruments ask it:

* ``batch_dependent(norm)``: does its *training* output for one sample depend on the other
  samples of the batch (BN and its variants)? Then training needs at least 2 samples per batch
  and process, and under DDP its statistics are per process. A class says so with a
  ``batch_dependent = True/False`` attribute; torch's own norms are known by type; anything else
  is assumed batch-dependent, the safe side (a batch of 1 is refused rather than silently
  normalized to zero).
* ``has_running_stats(norm)``: does it carry BN running statistics the way torch's ``_BatchNorm``
  does (``running_mean``, ``running_var`` and ``num_batches_tracked`` buffers, ``momentum``,
  ``eps``, ``reset_running_stats()``)? Then PreciseBN can recompute them and, in evaluation, it is
  the fixed per-channel affine map ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``
  that folding merges into the neighbouring Linear/Conv. A class whose evaluation is something
  else says ``foldable = False``.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["PER_SAMPLE_TORCH_NORMS", "batch_dependent", "foldable", "has_running_stats"]

# torch's norms that normalize each sample by its own statistics (Identity: no norm at all).
PER_SAMPLE_TORCH_NORMS: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
    _InstanceNorm,
)


def batch_dependent(norm: nn.Module | type[nn.Module]) -> bool:
    """Whether the layer's training output depends on the other samples of the batch."""
    cls = norm if isinstance(norm, type) else type(norm)
    declared = getattr(cls, "batch_dependent", None)
    if declared is not None:
        return bool(declared)
    if issubclass(cls, _BatchNorm):
        return True
    return not issubclass(cls, PER_SAMPLE_TORCH_NORMS)


def has_running_stats(norm: nn.Module) -> bool:
    """Whether the layer holds BN running statistics as torch's BatchNorm does."""
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return (
        all(isinstance(getattr(norm, name, None), Tensor) for name in buffers)
        and hasattr(norm, "momentum")
        and hasattr(norm, "eps")
        and callable(getattr(norm, "reset_running_stats", None))
    )


def foldable(norm: nn.Module) -> bool:
    """Whether, in evaluation, the layer is BN's fixed affine map of its running statistics."""
    return has_running_stats(norm) and getattr(type(norm), "foldable", True)
