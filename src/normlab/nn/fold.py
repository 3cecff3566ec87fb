"""Fold inference-mode BatchNorm into the Linear/Conv layer in front of it.

In evaluation a BN layer with running estimates is a fixed per-channel affine map,

    bn(z) = z * scale + shift,   scale = gamma / sqrt(running_var + eps),
                                 shift = beta - running_mean * scale,

and when ``z = W x + b`` comes straight out of a Linear/Conv, the two maps compose into one
layer of the same kind:

    bn(W x + b) = (scale * W) x + (scale * b + shift)

where ``scale * W`` scales output unit / output channel ``c`` (row ``c`` of the weight) by
``scale[c]``. The folded network computes the same function with one layer fewer and one
memory pass fewer per BN, which is what inference runtimes do.
"""

from __future__ import annotations

import copy
from itertools import pairwise

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from normlab.nn import batchnorm as ours

__all__ = ["fold_batchnorm"]

# Which BN may follow which layer. A Conv's output channels are axis 1, exactly the axis BN
# normalizes. A Linear's output features are its *last* axis, which is BN's channel axis only
# for 2-D (N, features) activations -- the case for MLPs; BatchNorm1d on (N, C, L) right after
# a Linear would not be the per-feature map folded here, so that is assumed not to happen.
_FOLDABLE: dict[type[nn.Module], tuple[type[nn.Module], ...]] = {
    nn.Linear: (nn.BatchNorm1d, ours.BatchNorm1d),
    nn.Conv1d: (nn.BatchNorm1d, ours.BatchNorm1d),
    nn.Conv2d: (nn.BatchNorm2d, ours.BatchNorm2d),
    nn.Conv3d: (nn.BatchNorm3d,),
}
_ANY_BATCH_NORM = (_TorchBatchNorm, ours._BatchNormBase)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode deep copy of ``model`` with every foldable BatchNorm merged away.

    A BatchNorm (torch's or normlab's, affine or not) is folded when it is the next sibling,
    in registration order, of a Linear/Conv1d/Conv2d/Conv3d in the same parent module -- as in
    ``nn.Sequential(Linear, BatchNorm1d, ...)`` or a block with children ``linear|conv, norm,
    act, ...`` -- and it has running estimates (``track_running_stats=False`` layers use batch
    statistics even in eval and cannot be folded). The layer's weight and bias absorb the BN
    (a bias is created if the layer had none) and the BN becomes ``nn.Identity``. Every other
    BN is left as it is. ``model`` itself is not modified.

    Registration order is assumed to be forward order, as in ``nn.Sequential``; a module whose
    forward uses its children in a different order must not be folded this way.
    """
    folded = copy.deepcopy(model)
    with torch.no_grad():
        for parent in list(folded.modules()):
            children = list(parent.named_children())
            for (_, layer), (name, norm) in pairwise(children):
                if _can_fold(layer, norm):
                    _fold_into(layer, norm)
                    setattr(parent, name, nn.Identity())
    return folded.eval()


def _can_fold(layer: nn.Module, norm: nn.Module) -> bool:
    if not isinstance(norm, _ANY_BATCH_NORM):
        return False
    if norm.running_mean is None or norm.running_var is None:
        return False
    if _uninitialized(layer) or _uninitialized(norm):
        return False
    for layer_type, norm_types in _FOLDABLE.items():
        if isinstance(layer, layer_type):
            channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            # SyncBatchNorm accepts any rank, so it may follow any of these layers.
            rank_ok = isinstance(norm, (*norm_types, nn.SyncBatchNorm))
            return rank_ok and norm.num_features == channels
    return False


def _uninitialized(module: nn.Module) -> bool:
    """Lazy modules (nn.LazyLinear, ...) have no shapes before their first forward."""
    return isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()


def _fold_into(layer: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d, norm: nn.Module) -> None:
    """Rewrite ``layer``'s weight and bias in place so that ``layer`` alone equals norm(layer)."""
    weight = layer.weight
    # Compute in float64, then round once to the layer's dtype.
    mean = norm.running_mean.double()
    scale = torch.rsqrt(norm.running_var.double() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()

    # Weight layout is (out, in, *kernel) for Linear and Conv alike: scale each output row.
    row_shape = [-1] + [1] * (weight.dim() - 1)
    layer.weight.copy_(weight.double() * scale.view(row_shape))
    old_bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
    new_bias = (old_bias * scale + shift).to(weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
    else:
        layer.bias.copy_(new_bias)
