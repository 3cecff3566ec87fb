"""MLP and CNN backbones built from four interchangeable parts: norm, activation, init, dropout.

Every hidden layer is a `Block`: weight layer (Linear/Conv) -> norm -> activation -> dropout
(-> pooling in the CNN), or with ``norm_position="post"`` weight layer -> activation -> norm ->
dropout. Blocks are named ``layer1``, ``layer2``, ... in forward order.

The parts are plain Python objects (``conf/`` names them by ``_target_``; see
`normlab.models.from_config`):

- ``norm``: a factory ``norm(num_features) -> nn.Module`` taking (N, C) and (N, C, H, W) inputs
  (e.g. ``functools.partial(normlab.nn.GroupNorm, groups=8)``), or None for no norm;
- ``activation``: a module (copied for every block) or a factory ``activation() -> nn.Module``;
- ``init``: a ``torch.nn.init``-style function applied in place to every Linear/Conv weight
  tensor (biases set to 0), or None to keep torch's initialisation.

What the probes need from a backbone (a user's own included) is three methods, each a dict in
forward order keyed ``layer1``, ``layer2``, ...: `nonlinearities()` (the activation modules,
whose *input* is the distribution internal-covariate-shift studies look at), `norm_layers()` (the
norm modules; empty without norm) and `weight_layers()` (the Linear/Conv of each block, then
``head``). `Backbone` provides them for any ``self.blocks`` of `Block`s.

Weights are created before any norm layer and norm layers draw no random numbers when built
(noisy BN draws only in training forward passes), so the same seed gives the same Linear/Conv
weights whatever the norm: `norm=none,bn,ln` is a paired comparison.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

NormFactory = Callable[[int], nn.Module]
Activation = nn.Module | Callable[[], nn.Module]
Init = Callable[[torch.Tensor], Any]
POSITIONS = ("pre", "post")
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def make_norm(norm: NormFactory | None, num_features: int) -> nn.Module:
    """The norm layer for `num_features` features or channels; Identity without a norm."""
    return nn.Identity() if norm is None else norm(num_features)


def make_activation(activation: Activation) -> nn.Module:
    """A fresh activation module: a copy of a module, or what a factory (class, partial) makes."""
    return copy.deepcopy(activation) if isinstance(activation, nn.Module) else activation()


def torch_default(weight: torch.Tensor) -> torch.Tensor:
    """`init=default`: torch's own Linear/Conv initialisation, bias included: nothing re-drawn."""
    return weight


def keeps_torch_init(init: Init | None) -> bool:
    """Whether `init` (a function, or a factory wrapping one) leaves torch's initialisation."""
    return init is None or getattr(init, "target", init) is torch_default


def init_weights(module: nn.Module, init: Init | None) -> None:
    """Apply `init` to each Linear/Conv weight of `module`, zero its bias; `torch_default` (or
    None) keeps torch's."""
    if keeps_torch_init(init):
        return
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, WEIGHT_LAYERS):
                init(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)


def require_images(model: str, input_shape: Sequence[int]) -> None:
    """Conv backbones need (channels, height, width) inputs: one line saying so otherwise."""
    if len(input_shape) != 3:
        raise ValueError(
            f"model={model} needs images (channels, height, width); this data has shape "
            f"{tuple(input_shape)}: use model=mlp"
        )


def equal_hidden_sizes(
    hidden_sizes: Sequence[int], depth: int | None, width: int | None
) -> list[int]:
    """`hidden_sizes`, or `depth` hidden layers of `width` units when either is given."""
    if len(hidden_sizes) == 0 and (depth is None or width is None):
        raise ValueError(
            "model.hidden_sizes is empty; give at least one hidden size, e.g. [32, 32]"
        )
    if depth is None and width is None:
        return list(hidden_sizes)
    depth = len(hidden_sizes) if depth is None else depth
    width = hidden_sizes[0] if width is None else width
    if depth < 1:
        raise ValueError(f"model.depth={depth}: an MLP needs at least one hidden layer")
    if width < 1:
        raise ValueError(f"model.width={width}: a hidden layer needs at least one unit")
    return [width] * depth


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
            raise ValueError(
                f"norm.position={position!r} is not valid; choose one of: {', '.join(POSITIONS)}"
            )
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

    (norm and activation swap places with ``norm_position="post"``.) ``depth`` and ``width``, when
    given, make ``depth`` equal hidden layers of ``width`` units (either alone keeps the other from
    `hidden_sizes`: its length, its first size).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden_sizes: Sequence[int] = (32, 32),
        norm: NormFactory | None = None,
        activation: Activation = nn.ReLU,
        init: Init | None = None,
        dropout: float = 0.0,
        norm_position: str = "pre",
        depth: int | None = None,
        width: int | None = None,
    ) -> None:
        super().__init__()
        hidden_sizes = equal_hidden_sizes(hidden_sizes, depth, width)
        sizes = [math.prod(input_shape), *hidden_sizes]
        self.flatten = nn.Flatten()
        self.blocks = nn.Sequential(
            OrderedDict(
                (
                    f"layer{i + 1}",
                    Block(
                        nn.Linear(n_in, n_out),
                        make_norm(norm, n_out),
                        make_activation(activation),
                        dropout,
                        position=norm_position,
                    ),
                )
                for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
            )
        )
        self.head = nn.Linear(sizes[-1], num_classes)
        init_weights(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.flatten(x)))


class CNN(Backbone):
    """[Conv3x3 -> norm -> activation -> dropout -> maxpool] x len(channels) -> avg pool -> Linear.

    (norm and activation swap places with ``norm_position="post"``.)

    Blocks pool 2x2 while the feature map is at least 4 pixels wide, so 8x8 digits and
    32x32 CIFAR images both work.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (16, 32),
        norm: NormFactory | None = None,
        activation: Activation = nn.ReLU,
        init: Init | None = None,
        dropout: float = 0.0,
        norm_position: str = "pre",
    ) -> None:
        super().__init__()
        require_images("cnn", input_shape)
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
                make_norm(norm, c_out),
                make_activation(activation),
                dropout,
                pool,
                position=norm_position,
            )
        self.blocks = nn.Sequential(blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels[-1], num_classes)
        init_weights(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.blocks(x)))
