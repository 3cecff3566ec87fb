"""VGG-style conv stacks (Simonyan & Zisserman 2015), the network of Santurkar et al. 2018.

A config list says the layout: an integer is a 3x3 conv (padding 1) with that many channels,
``"M"`` a 2x2 max-pool after the conv before it. Every conv is a `Block` (conv -> norm ->
activation -> dropout [-> pool]) named ``layer1``, ``layer2``, ... in forward order, so the ICS
callbacks see VGG like the MLP and CNN. The head is one Linear on the flattened last feature map
(the usual CIFAR VGG: 512 x 1 x 1 -> classes for vgg11 on 32x32).

Convs are created before any norm layer and norms draw no random numbers: the same seed gives the
same conv weights whatever the norm, so `norm=none,bn` is a paired comparison.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from normlab.models.backbones import (
    Activation,
    Backbone,
    Block,
    Init,
    NormFactory,
    init_weights,
    make_activation,
    make_norm,
    require_images,
)

Layout = Sequence[int | str]

PRESETS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    # vgg11's shape (1-1-2-2 convs between pools) at 1/4 of its width, with the 3 pools that an
    # 8x8 digit allows (8 -> 4 -> 2 -> 1; MNIST 28 -> 3): trains on 2 CPU cores in minutes.
    "vgg_small": [16, "M", 32, "M", 64, 64, "M", 128, 128],
}


def resolve_layout(preset: str | None, config: Layout | None) -> tuple[str, list[int | str]]:
    """(what to call it in messages, the layout): an explicit `config` wins over `preset`."""
    if config is not None:
        return f"model.config={list(config)}", list(config)
    if preset not in PRESETS:
        valid = ", ".join(PRESETS)
        raise ValueError(f"model.preset={preset!r} is not valid; choose one of: {valid}")
    return f"model.preset={preset}", PRESETS[preset]


def check_layout(name: str, layout: Layout, input_shape: Sequence[int]) -> None:
    """One clear line for a layout that cannot work on this input."""
    require_images("vgg", input_shape)
    if not any(isinstance(item, int) for item in layout):
        raise ValueError(f"{name} has no conv layer; give channel counts, e.g. [16, M, 32, M]")
    for i, item in enumerate(layout):
        if item == "M":
            if i == 0 or layout[i - 1] == "M":
                raise ValueError(f"{name}: every 'M' (max-pool) must follow a conv channel count")
        elif isinstance(item, bool) or not isinstance(item, int) or item < 1:
            raise ValueError(f"{name}: {item!r} is neither a channel count >= 1 nor 'M'")
    pools = layout.count("M")
    size = min(input_shape[1:])
    if size < 2**pools:
        fits = int(math.log2(size)) if size >= 1 else 0
        raise ValueError(
            f"{name} pools {pools} times but the input is {input_shape[1]}x{input_shape[2]}, which "
            f"allows at most {fits}: use model.preset=vgg_small or a layout with fewer 'M'"
        )


class VGG(Backbone):
    """[3x3 conv -> norm -> activation -> dropout (-> max-pool at 'M')] per conv -> Linear."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        preset: str | None = "vgg_small",
        config: Layout | None = None,
        norm: NormFactory | None = None,
        activation: Activation = nn.ReLU,
        init: Init | None = None,
        dropout: float = 0.0,
        norm_position: str = "pre",
    ) -> None:
        super().__init__()
        name, layout = resolve_layout(preset, config)
        check_layout(name, layout, input_shape)
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        channels, size = input_shape[0], tuple(input_shape[1:])
        for i, item in enumerate(layout):
            if item == "M":
                continue
            pooled = i + 1 < len(layout) and layout[i + 1] == "M"
            blocks[f"layer{len(blocks) + 1}"] = conv_block(
                channels, item, norm, activation, dropout, pooled, norm_position
            )
            channels = item
            size = tuple(s // 2 for s in size) if pooled else size
        self.blocks = nn.Sequential(blocks)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(channels * math.prod(size), num_classes)
        init_weights(self, init)

    def forward(self, x):
        return self.head(self.flatten(self.blocks(x)))


def conv_block(
    c_in: int,
    c_out: int,
    norm: NormFactory | None,
    activation: Activation,
    dropout: float,
    pooled: bool,
    norm_position: str = "pre",
) -> Block:
    """One VGG layer: conv -> norm -> activation (or conv -> activation -> norm with
    `norm_position="post"`) -> dropout -> [max-pool]."""
    return Block(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
        make_norm(norm, c_out),
        make_activation(activation),
        dropout,
        nn.MaxPool2d(2) if pooled else None,
        position=norm_position,
    )
