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

A BN *after* the activation (``norm.position=post``: Linear -> act -> BN -> [dropout] ->
Linear) folds instead into the *next* layer, along its input axis:

    W' bn(z) + b' = (W' * scale) z + (W' shift + b')

(``W' * scale`` scales input column / input channel ``c``). For a convolution this is exact
only without zero padding: padding inserts zeros *after* the BN, where the folded conv would
see ``shift`` at the borders. So a post-BN folds into a Linear or into a padding-free,
ungrouped Conv, and is otherwise left in place with its reason. Only Identity and Dropout
(both identities in evaluation) may stand between the BN and that next layer.

LayerNorm, GroupNorm and RMSNorm are never folded: they normalize each sample by its own
statistics, so in evaluation they are still not a fixed affine map.
"""

from __future__ import annotations

import copy
import warnings
from itertools import pairwise

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from normlab.nn import batchnorm as ours
from normlab.nn.traits import (
    PER_SAMPLE_TORCH_NORMS,
    batch_dependent,
    foldable,
    has_running_stats,
)

__all__ = ["FoldWarning", "fold_batchnorm"]

# A norm folds when, in evaluation, it is BN's affine map of its running statistics
# (normlab.nn.traits.foldable: read from the layer, a user's own included). torch's rank-specific
# BN classes must also sit on the matching weight layer: a Conv's output channels are axis 1,
# exactly the axis BN normalizes; a Linear's output features are its *last* axis, which is BN's
# channel axis only for 2-D (N, features) activations -- the case for MLPs. Rank-agnostic norms
# (TorchBatchNorm, our BatchNorm, SyncBatchNorm) fit any weight layer.
_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RANK_SPECIFIC: dict[type[nn.Module], tuple[type[nn.Module], ...]] = {
    nn.BatchNorm1d: (nn.Linear, nn.Conv1d),
    ours.BatchNorm1d: (nn.Linear, nn.Conv1d),
    nn.BatchNorm2d: (nn.Conv2d,),
    ours.BatchNorm2d: (nn.Conv2d,),
    nn.BatchNorm3d: (nn.Conv3d,),
}
_IDENTITY_IN_EVAL = (nn.Identity, nn.Dropout)


class FoldWarning(UserWarning):
    """A norm layer that fold_batchnorm left in place, and why."""


def fold_batchnorm(model: nn.Module, report: list[str] | None = None) -> nn.Module:
    """An eval-mode deep copy of ``model`` with every foldable BatchNorm merged away.

    A BatchNorm (torch's or normlab's, affine or not, with running estimates) is folded

    * into the layer before it when it is the next sibling, in registration order, of a
      Linear/Conv1d/Conv2d/Conv3d in the same parent module -- as in
      ``nn.Sequential(Linear, BatchNorm1d, ...)`` or a block ``linear|conv, norm, act, ...``;
    * otherwise (a BN after the activation) into the next Linear, or padding-free ungrouped
      Conv, in forward order, with only Identity/Dropout in between (see the module docstring).

    The layer's weight and bias absorb the BN (a bias is created if the layer had none) and the
    BN becomes ``nn.Identity``. Every other BN, and every LayerNorm/GroupNorm/RMSNorm, stays,
    with a ``FoldWarning`` saying why. ``report``, if given, receives one line per norm layer:
    what was folded into what, or why not. ``model`` itself is not modified.

    Registration order is assumed to be forward order, as in ``nn.Sequential``; a module whose
    forward uses its children in a different order must not be folded this way.
    """
    folded = copy.deepcopy(model)
    notes = report if report is not None else []
    _bake_parametrizations(folded)
    with torch.no_grad():
        names = {module: name for name, module in folded.named_modules()}
        for parent in list(folded.modules()):
            children = list(parent.named_children())
            for (_, layer), (name, norm) in pairwise(children):
                if _can_fold(layer, norm):
                    _fold_into(layer, norm)
                    setattr(parent, name, nn.Identity())
                    notes.append(f"{names[norm]}: folded into {names[layer]} (before it)")
        _fold_post_norms(folded, names, notes)
    return folded.eval()


def _bake_parametrizations(model: nn.Module) -> None:
    """Replace parametrized weights (Weight Standardization, weight norm: ``weights=`` of the lab)
    by the effective weight they compute, so a BN folds into the weight the layer really uses."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            values = {name: getattr(module, name).detach().clone()
                      for name in module.parametrizations}
            # Not parametrize.remove_parametrizations: the copy shares its parametrized class
            # with the original model, and removing would strip the original's properties too.
            module.__class__ = type(module).__bases__[0]
            del module._modules["parametrizations"]
            for name, value in values.items():
                module.register_parameter(name, nn.Parameter(value))


def _fold_post_norms(model: nn.Module, names: dict[nn.Module, str], notes: list[str]) -> None:
    """Fold each remaining BN into the next weight layer, or record why it stays."""
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    norms = _declared_norms(model)
    for i, (name, norm) in enumerate(leaves):
        if not foldable(norm):
            if norm in norms or _looks_like_norm(norm):
                _left(notes, name, _why_not_foldable(norm))
            continue
        following = [m for _, m in leaves[i + 1 :] if not isinstance(m, _IDENTITY_IN_EVAL)]
        after = following[0] if following else None
        reason = _post_fold_problem(norm, after)
        if reason is not None:
            _left(notes, name, reason)
            continue
        _fold_into_next(after, norm)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, nn.Identity())
        notes.append(f"{name}: folded into {names[after]} (after it)")


def _declared_norms(model: nn.Module) -> set[nn.Module]:
    """The norm layers a backbone names (its `norm_layers()`), if it has that method."""
    norm_layers = getattr(model, "norm_layers", None)
    return set(norm_layers().values()) if callable(norm_layers) else set()


def _looks_like_norm(module: nn.Module) -> bool:
    """A norm layer in a model that does not name its norms: torch's, or one that says whether
    it is batch-dependent (every norm of normlab.nn does)."""
    if isinstance(module, nn.Identity):
        return False
    declares = getattr(type(module), "batch_dependent", None) is not None
    return declares or isinstance(module, PER_SAMPLE_TORCH_NORMS) or has_running_stats(module)


def _why_not_foldable(norm: nn.Module) -> str:
    kind = type(norm).__name__
    if has_running_stats(norm):
        return f"{kind} is not BN's affine map of its running statistics in evaluation"
    if getattr(norm, "track_running_stats", True) is False or hasattr(norm, "running_mean"):
        return (
            "no running statistics (track_running_stats=False): it uses batch statistics in "
            "evaluation too"
        )
    if not batch_dependent(norm):
        return (
            f"{kind} normalizes each sample by its own statistics: not a fixed affine map in "
            "evaluation, nothing to fold"
        )
    return (
        f"{kind} has no running statistics: it normalizes by statistics computed at inference, "
        "not a fixed affine map in evaluation, nothing to fold"
    )


def _left(notes: list[str], name: str, reason: str) -> None:
    notes.append(f"{name}: left in place: {reason}")
    warnings.warn(f"fold_batchnorm: {name} left in place: {reason}", FoldWarning, stacklevel=3)


def _post_fold_problem(norm: nn.Module, layer: nn.Module | None) -> str | None:
    """Why ``norm`` cannot fold into the following ``layer`` (None: it can)."""
    if not isinstance(layer, _WEIGHT_LAYERS):
        kind = "nothing" if layer is None else type(layer).__name__
        return f"no Linear/Conv follows it directly ({kind} comes next)"
    if _uninitialized(layer) or _uninitialized(norm):
        return "uninitialized lazy module"
    if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        if layer.groups != 1:
            return "the next conv is grouped"
        if layer.padding_mode != "zeros" or any(p != 0 for p in _padding(layer)):
            return (
                "the next conv pads its input with zeros after the BN; folding the BN shift "
                "into it would be wrong at the borders (exact only with padding=0)"
            )
    channels = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    if not _rank_fits(layer, norm) or norm.num_features != channels:
        return f"its {norm.num_features} features do not match the next layer's input"
    return None


def _rank_fits(layer: nn.Module, norm: nn.Module) -> bool:
    """A rank-specific BN class (BatchNorm1d, ...) only fits its own kind of weight layer."""
    for norm_type, layer_types in _RANK_SPECIFIC.items():
        if isinstance(norm, norm_type):
            return isinstance(layer, layer_types)
    return True


def _padding(conv: nn.Module) -> tuple[int, ...]:
    padding = conv.padding
    if padding == "valid":
        return (0,)
    if padding == "same":
        return tuple(k // 2 + (k + 1) % 2 for k in conv.kernel_size)  # non-zero unless 1x1
    return tuple(padding)


def _can_fold(layer: nn.Module, norm: nn.Module) -> bool:
    if not isinstance(layer, _WEIGHT_LAYERS) or not foldable(norm):
        return False
    if _uninitialized(layer) or _uninitialized(norm):
        return False
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return _rank_fits(layer, norm) and getattr(norm, "num_features", None) == channels


def _uninitialized(module: nn.Module) -> bool:
    """Lazy modules (nn.LazyLinear, ...) have no shapes before their first forward."""
    return isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()


def _affine_of(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode BN as ``z * scale + shift`` (float64 vectors)."""
    mean = norm.running_mean.double()
    scale = torch.rsqrt(norm.running_var.double() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    return scale, shift


def _fold_into_next(layer: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d, norm: nn.Module) -> None:
    """Rewrite ``layer`` in place so that ``layer`` alone equals layer(norm(.))."""
    scale, shift = _affine_of(norm)
    weight = layer.weight.double()
    # Weight layout is (out, in, *kernel): scale each input column / channel; the shift,
    # seen through the weights, adds a constant to every output.
    column_shape = [1, -1] + [1] * (weight.dim() - 2)
    added_bias = (weight * shift.view(column_shape)).flatten(1).sum(1)
    old_bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(added_bias)
    new_bias = (old_bias + added_bias).to(layer.weight.dtype)
    layer.weight.copy_(weight * scale.view(column_shape))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias, requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.copy_(new_bias)


def _fold_into(layer: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d, norm: nn.Module) -> None:
    """Rewrite ``layer``'s weight and bias in place so that ``layer`` alone equals norm(layer)."""
    weight = layer.weight
    # Compute in float64, then round once to the layer's dtype.
    scale, shift = _affine_of(norm)

    # Weight layout is (out, in, *kernel) for Linear and Conv alike: scale each output row.
    row_shape = [-1] + [1] * (weight.dim() - 1)
    layer.weight.copy_(weight.double() * scale.view(row_shape))
    old_bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
    new_bias = (old_bias * scale + shift).to(weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
    else:
        layer.bias.copy_(new_bias)
