"""MLP and CNN backbones built from four interchangeable choices: norm, activation, init, dropout.

Every hidden layer is a `Block`: weight layer (Linear/Conv) -> norm -> activation -> dropout
(-> pooling in the CNN), or with ``norm.position=post`` weight layer -> activation -> norm ->
dropout. Blocks are named ``layer1``, ``layer2``, ... in forward order; `nonlinearities()` maps
those names to the activation modules, whose *input* is the distribution that
internal-covariate-shift studies look at, and `norm_layers()` to the norm modules.

Weights are created before any norm layer and norm layers draw no random numbers when built
(noisy BN draws only in training forward passes), so the same seed gives the same Linear/Conv
weights whatever the norm: `norm=none,bn,ln` is a paired comparison.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

import normlab.nn as ours

Spec = Mapping[str, Any] | str

NormFactory = Callable[..., nn.Module]


def _groupnorm(
    num_features: int, groups: int = 8, affine: bool = True, **options: Any
) -> nn.Module:
    return nn.GroupNorm(group_count(groups, num_features), num_features, affine=affine, **options)


def _layernorm_of_images(num_features: int, affine: bool = True, **options: Any) -> nn.Module:
    # LayerNorm's statistics (over C, H, W of one sample) with a per-channel gamma/beta.
    return nn.GroupNorm(1, num_features, affine=affine, **options)


# name -> {spatial_dims: factory(num_features, **options)}; 1: (N, C) features, 2: (N, C, H, W).
# Config keys are the same for every norm (`affine`, `eps`), whatever torch calls them.
NORMS: dict[str, dict[int, NormFactory] | None] = {
    "none": None,
    "bn": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d},
    "custom_bn": {1: ours.BatchNorm1d, 2: ours.BatchNorm2d},
    "ln": {
        1: lambda c, affine=True, **o: nn.LayerNorm(c, elementwise_affine=affine, **o),
        2: _layernorm_of_images,
    },
    "gn": {1: _groupnorm, 2: _groupnorm},
    "rms": {
        1: lambda c, affine=True, **o: nn.RMSNorm(c, elementwise_affine=affine, **o),
        2: lambda c, affine=True, **o: ours.RMSNorm2d(c, elementwise_affine=affine, **o),
    },
    "batch_renorm": {1: ours.BatchRenorm1d, 2: ours.BatchRenorm2d},
    "ghost_bn": {1: ours.GhostBatchNorm1d, 2: ours.GhostBatchNorm2d},
    "noisy_bn": {1: ours.NoisyBatchNorm1d, 2: ours.NoisyBatchNorm2d},
}
# Norms whose training output depends on the other samples of the batch.
BATCH_DEPENDENT_NORMS = ("bn", "custom_bn", "batch_renorm", "ghost_bn", "noisy_bn")
POSITIONS = ("pre", "post")
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}
INITS = ("default", "normal", "zeros", "xavier_normal", "xavier_uniform", "he_normal", "he_uniform")


def _split(spec: Spec, kind: str, valid: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """`{"name": "bn", "eps": 1e-5}` or `"bn"` -> ("bn", {"eps": 1e-5}), checking the name."""
    options = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = options.pop("name", None)
    if name not in valid:
        raise ValueError(f"{kind}={name!r} is not valid; choose one of: {', '.join(valid)}")
    return name, options


def group_count(groups: int, channels: int) -> int:
    """`groups` clamped to `channels`; ValueError naming the valid counts if it does not divide."""
    count = min(groups, channels)
    if count < 1 or channels % count != 0:
        valid = [d for d in range(1, channels + 1) if channels % d == 0]
        raise ValueError(
            f"norm.groups={groups} does not divide {channels} channels; "
            f"valid: {', '.join(map(str, valid))}"
        )
    return count


def norm_position(spec: Spec) -> str:
    """Where the norm goes: `pre` (before the activation, default) or `post` (after it)."""
    position = "pre" if isinstance(spec, str) else spec.get("position", "pre")
    if position not in POSITIONS:
        raise ValueError(f"norm.position={position!r} is not valid; choose one of: pre, post")
    return position


def make_norm(spec: Spec, num_features: int, spatial_dims: int) -> nn.Module:
    """The norm layer for `num_features` features (spatial_dims=1: per feature, 2: per channel).

    `spec` is a norm config (`{"name": "gn", "groups": 8, ...}`) or a name; its `position` key
    is for the block (see `Block`), every other key goes to the layer.
    """
    name, options = _split(spec, "norm", list(NORMS))
    options.pop("position", None)
    factories = NORMS[name]
    if factories is None:
        return nn.Identity()
    return factories[spatial_dims](num_features, **options)


def make_activation(spec: Spec) -> nn.Module:
    name, options = _split(spec, "activation", list(ACTIVATIONS))
    return ACTIVATIONS[name](**options)


def init_weights(module: nn.Module, spec: Spec, activation: Spec = "relu") -> None:
    """Initialise every Linear/Conv weight (and zero its bias) in place; `default` keeps torch's."""
    name, options = _split(spec, "init", INITS)
    if name == "default":
        return
    act_name, act_options = _split(activation, "activation", list(ACTIVATIONS))
    # He init is derived for ReLU-like units; pass the slope so leaky_relu gets its own gain.
    nonlinearity = "leaky_relu" if act_name == "leaky_relu" else "relu"
    slope = act_options.get("negative_slope", 0.01) if act_name == "leaky_relu" else 0.0
    for layer in module.modules():
        if not isinstance(layer, nn.Linear | nn.Conv1d | nn.Conv2d):
            continue
        weight = layer.weight
        if name == "normal":
            nn.init.normal_(weight, 0.0, options.get("std", 1.0))
        elif name == "zeros":
            nn.init.zeros_(weight)
        elif name == "xavier_normal":
            nn.init.xavier_normal_(weight)
        elif name == "xavier_uniform":
            nn.init.xavier_uniform_(weight)
        elif name == "he_normal":
            nn.init.kaiming_normal_(weight, a=slope, nonlinearity=nonlinearity)
        elif name == "he_uniform":
            nn.init.kaiming_uniform_(weight, a=slope, nonlinearity=nonlinearity)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


class Block(nn.Sequential):
    """linear|conv -> norm -> activation -> dropout [-> pool]; the unit ICS is measured on.

    `position="post"` puts the norm after the activation: linear|conv -> act -> norm -> ...
    Children are registered in forward order (folding relies on it).
    """

    def __init__(
        self,
        weight: nn.Module,
        norm: nn.Module,
        act: nn.Module,
        dropout: float,
        pool: nn.Module | None = None,
        *,
        position: str = "pre",
    ) -> None:
        if position not in POSITIONS:
            raise ValueError(f"norm.position={position!r} is not valid; choose one of: pre, post")
        normalize_then_act = [("norm", norm), ("act", act)]
        parts: list[tuple[str, nn.Module]] = [
            ("linear" if isinstance(weight, nn.Linear) else "conv", weight),
            *(normalize_then_act if position == "pre" else normalize_then_act[::-1]),
            ("drop", nn.Dropout(dropout) if dropout > 0 else nn.Identity()),
        ]
        if pool is not None:
            parts.append(("pool", pool))
        super().__init__(OrderedDict(parts))


class Backbone(nn.Module):
    """Common part of MLP and CNN: named blocks, a head, and the nonlinearity lookup."""

    blocks: nn.Sequential
    head: nn.Module

    def nonlinearities(self) -> dict[str, nn.Module]:
        """`{"layer1": <activation module>, ...}` in forward order."""
        return {name: block.act for name, block in self.blocks.named_children()}

    def norm_layers(self) -> dict[str, nn.Module]:
        """`{"layer1": <norm module>, ...}` in forward order; empty with norm=none."""
        return {
            name: block.norm
            for name, block in self.blocks.named_children()
            if not isinstance(block.norm, nn.Identity)
        }

    def weight_layers(self) -> dict[str, nn.Module]:
        """`{"layer1": <Linear/Conv>, ..., "head": <Linear>}` in forward order."""
        layers = {name: block[0] for name, block in self.blocks.named_children()}
        layers["head"] = self.head
        return layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


class MLP(Backbone):
    """Flatten -> [Linear -> norm -> activation -> dropout] x len(hidden_sizes) -> Linear.

    (norm and activation swap places with `norm.position=post`.)
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden_sizes: Sequence[int] = (32, 32),
        norm: Spec = "bn",
        activation: Spec = "relu",
        init: Spec = "default",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(hidden_sizes) == 0:
            raise ValueError(
                "model.hidden_sizes is empty; give at least one hidden size, e.g. [32, 32]"
            )
        sizes = [math.prod(input_shape), *hidden_sizes]
        self.flatten = nn.Flatten()
        self.blocks = nn.Sequential(
            OrderedDict(
                (
                    f"layer{i + 1}",
                    Block(
                        nn.Linear(n_in, n_out),
                        make_norm(norm, n_out, 1),
                        make_activation(activation),
                        dropout,
                        position=norm_position(norm),
                    ),
                )
                for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
            )
        )
        self.head = nn.Linear(sizes[-1], num_classes)
        init_weights(self, init, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.flatten(x)))


class CNN(Backbone):
    """[Conv3x3 -> norm -> activation -> dropout -> maxpool] x len(channels) -> avg pool -> Linear.

    (norm and activation swap places with `norm.position=post`.)

    Blocks pool 2x2 while the feature map is at least 4 pixels wide, so 8x8 digits and
    32x32 CIFAR images both work.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (16, 32),
        norm: Spec = "bn",
        activation: Spec = "relu",
        init: Spec = "default",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(
                f"model=cnn needs images (channels, height, width); this data has shape "
                f"{tuple(input_shape)}: use model=mlp"
            )
        if len(channels) == 0:
            raise ValueError(
                "model.channels is empty; give at least one channel count, e.g. [16, 32]"
            )
        blocks = OrderedDict()
        width = min(input_shape[1:])
        for i, (c_in, c_out) in enumerate(
            zip([input_shape[0], *channels[:-1]], channels, strict=True)
        ):
            pool = nn.MaxPool2d(2) if width >= 4 else None
            width = width // 2 if pool is not None else width
            blocks[f"layer{i + 1}"] = Block(
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
                make_norm(norm, c_out, 2),
                make_activation(activation),
                dropout,
                pool,
                position=norm_position(norm),
            )
        self.blocks = nn.Sequential(blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels[-1], num_classes)
        init_weights(self, init, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.blocks(x)))
