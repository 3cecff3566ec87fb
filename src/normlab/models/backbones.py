"""MLP and CNN backbones built from four interchangeable choices: norm, activation, init, dropout.

Every hidden layer is a `Block`: weight layer (Linear/Conv) -> norm -> activation -> dropout
(-> pooling in the CNN). Blocks are named ``layer1``, ``layer2``, ... in forward order, and
`nonlinearities()` maps those names to the activation modules, whose *input* is the
distribution that internal-covariate-shift studies look at.

Weights are created before any norm layer and norm layers draw no random numbers, so the same
seed gives the same Linear/Conv weights whatever the norm: `norm=none,bn` is a paired comparison.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

import normlab.nn as ours

Spec = Mapping[str, Any] | str

NORMS: dict[str, dict[int, type[nn.Module]] | None] = {
    "none": None,
    "bn": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d},
    "custom_bn": {1: ours.BatchNorm1d, 2: ours.BatchNorm2d},
}
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


def make_norm(spec: Spec, num_features: int, spatial_dims: int) -> nn.Module:
    """The norm layer for `num_features` features (spatial_dims=1: per feature, 2: per channel)."""
    name, options = _split(spec, "norm", list(NORMS))
    classes = NORMS[name]
    if classes is None:
        return nn.Identity()
    return classes[spatial_dims](num_features, **options)


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
    """linear|conv -> norm -> activation -> dropout [-> pool]; the unit ICS is measured on."""

    def __init__(
        self,
        weight: nn.Module,
        norm: nn.Module,
        act: nn.Module,
        dropout: float,
        pool: nn.Module | None = None,
    ) -> None:
        parts: list[tuple[str, nn.Module]] = [
            ("linear" if isinstance(weight, nn.Linear) else "conv", weight),
            ("norm", norm),
            ("act", act),
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
        """`{"layer1": <norm module>, ...}` in forward order (`Identity` without a norm)."""
        return {name: block.norm for name, block in self.blocks.named_children()}

    def weight_layers(self) -> dict[str, nn.Module]:
        """`{"layer1": <Linear/Conv>, ..., "head": <Linear>}` in forward order."""
        layers = {name: block[0] for name, block in self.blocks.named_children()}
        layers["head"] = self.head
        return layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


class MLP(Backbone):
    """Flatten -> [Linear -> norm -> activation -> dropout] x len(hidden_sizes) -> Linear."""

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
            )
        self.blocks = nn.Sequential(blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels[-1], num_classes)
        init_weights(self, init, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.blocks(x)))
