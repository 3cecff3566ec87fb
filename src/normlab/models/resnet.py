"""CIFAR-style residual networks (He et al. 2016, "Deep Residual Learning", Sec. 4.2).

``depth = 6n + 2``: a 3x3 conv stem (16 channels), three stages of ``n`` basic blocks with 16, 32
and 64 channels (the second and third start with stride 2), global average pooling, one Linear
head. ``preset=resnet20|32|56`` is n = 3, 5, 9 (0.27 M, 0.46 M, 0.85 M parameters on CIFAR-10
with option A shortcuts).

- ``shortcut="A"``: identity, and where the shape changes the input subsampled by 2 and
  zero-padded to the new channel count (no parameters, the paper's CIFAR choice); ``"B"``: a 1x1
  conv (stride 2) + norm where the shape changes, identity elsewhere.
- ``preact=True``: the pre-activation block of He et al. 2016b, ``x + conv(act(norm(conv(act(
  norm(x))))))``, with a final norm -> act before the pooling.
- ``zero_init_residual=True``: the gamma of each branch's last norm starts at 0, so every block
  starts as the identity (Goyal et al. 2017); a norm without affine parameters is left alone.
- ``skipinit=True``: SkipInit (De & Smith 2020): each residual branch is multiplied by a learned
  scalar that starts at 0 -- the normalization-free way to start at the identity (``norm=none``).

``norm_position="post"`` swaps norm and activation wherever they follow each other in a branch
(conv -> act -> norm); the norm before the addition stays where it is.

The probes' protocol (`Backbone`): the stem is ``layer1``, the residual blocks are ``layer2``,
``layer3``, ... in forward order. Per layer, `nonlinearities()` is the block's first activation,
`norm_layers()` its first norm and `weight_layers()` its first conv (then ``head``); the depth
probe measures each block's output. Convs are created before any norm (and norms draw no random
numbers), so the same seed gives the same convs whatever the norm.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from normlab.models.backbones import (
    POSITIONS,
    Activation,
    Backbone,
    Block,
    Init,
    NormFactory,
    init_weights,
    keeps_torch_init,
    make_activation,
    make_norm,
    require_images,
)

PRESETS = {"resnet20": 20, "resnet32": 32, "resnet56": 56, "resnet110": 110}
STAGE_CHANNELS = (16, 32, 64)
SHORTCUTS = ("A", "B")


def blocks_per_stage(preset: str | None, depth: int | None) -> tuple[str, int]:
    """(what to call it in messages, n) for depth 6n + 2; an explicit `depth` wins."""
    if depth is None:
        if preset not in PRESETS:
            raise ValueError(
                f"model.preset={preset!r} is not valid; choose one of: {', '.join(PRESETS)}"
            )
        name, depth = f"model.preset={preset}", PRESETS[preset]
    else:
        name = f"model.depth={depth}"
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"{name}: a CIFAR ResNet has depth 6n + 2 (8, 14, 20, 26, 32, ..., 56)")
    return name, (depth - 2) // 6


class ShortcutA(nn.Module):
    """Option A: subsample by `stride`, zero-pad the channels from `c_in` to `c_out`."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.pad, self.stride = c_out - c_in, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class Residual(nn.Module):
    """One basic block: ``act(x + branch(x))`` (post-activation) or ``x + branch(x)`` (preact).

    Children registered in forward order: conv1, norm1, act1, conv2, norm2, shortcut, act2
    (preact: norm1, act1, conv1, norm2, act2, conv2, shortcut), so `fold_batchnorm` folds each BN
    into the conv in front of it; the SkipInit scalar is a parameter, `alpha`.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int,
        norm: NormFactory | None,
        activation: Activation,
        *,
        shortcut: str = "A",
        preact: bool = False,
        skipinit: bool = False,
        position: str = "pre",
    ) -> None:
        super().__init__()
        self.preact, self.position = preact, position
        # Weights first (same seed, same convs whatever the norm), then the norms; registered
        # below in forward order (folding BN into the conv before it relies on that order).
        conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        reshape = stride != 1 or c_in != c_out
        projection = shortcut == "B" and reshape
        short_conv = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if projection else None
        norm1, act1 = make_norm(norm, c_in if preact else c_out), make_activation(activation)
        norm2, act2 = make_norm(norm, c_out), make_activation(activation)
        first = [("norm1", norm1), ("act1", act1)]
        first = first if position == "pre" else first[::-1]
        second = [("norm2", norm2), ("act2", act2)]
        second = second if position == "pre" else second[::-1]
        if preact:
            order = [*first, ("conv1", conv1), *second, ("conv2", conv2)]
        else:
            order = [("conv1", conv1), *first, ("conv2", conv2), ("norm2", norm2)]
        for name, module in order:
            setattr(self, name, module)
        if projection:
            self.shortcut = nn.Sequential(short_conv, make_norm(norm, c_out))
        elif reshape:
            self.shortcut = ShortcutA(c_in, c_out, stride)
        else:
            self.shortcut = nn.Identity()
        self.alpha = nn.Parameter(torch.zeros(())) if skipinit else None
        if not preact:
            self.act2 = act2  # after the addition

    def _norm_act(self, x: torch.Tensor, norm: nn.Module, act: nn.Module) -> torch.Tensor:
        return act(norm(x)) if self.position == "pre" else norm(act(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            out = self.conv1(self._norm_act(x, self.norm1, self.act1))
            out = self.conv2(self._norm_act(out, self.norm2, self.act2))
        else:
            out = self.norm2(self.conv2(self._norm_act(self.conv1(x), self.norm1, self.act1)))
        if self.alpha is not None:
            out = self.alpha * out
        out = out + self.shortcut(x)
        return out if self.preact else self.act2(out)

    def last_norm(self) -> nn.Module:
        """The norm whose gamma `zero_init_residual` zeroes (the branch's last one)."""
        return self.norm2


class ResNet(Backbone):
    """CIFAR ResNet: stem conv -> 3 stages of n basic blocks -> avg pool -> Linear."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        preset: str | None = "resnet20",
        depth: int | None = None,
        width: int = 16,
        shortcut: str = "A",
        preact: bool = False,
        zero_init_residual: bool = False,
        skipinit: bool = False,
        norm: NormFactory | None = None,
        activation: Activation = nn.ReLU,
        init: Init | None = None,
        norm_position: str = "pre",
    ) -> None:
        super().__init__()
        require_images("resnet", input_shape)
        _, n = blocks_per_stage(preset, depth)
        if shortcut not in SHORTCUTS:
            raise ValueError(
                f"model.shortcut={shortcut!r} is not valid; choose one of: {', '.join(SHORTCUTS)}"
            )
        if norm_position not in POSITIONS:
            raise ValueError(
                f"norm.position={norm_position!r} is not valid; choose one of: "
                f"{', '.join(POSITIONS)}"
            )
        if width < 1:
            raise ValueError(f"model.width={width}: the stem's channel count must be >= 1")
        channels = [width * c // STAGE_CHANNELS[0] for c in STAGE_CHANNELS]
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        stem = nn.Conv2d(input_shape[0], channels[0], 3, padding=1, bias=False)
        blocks["layer1"] = Block(
            stem, make_norm(norm, channels[0]), make_activation(activation), 0.0,
            position=norm_position,
        )
        c_in = channels[0]
        for stage, c_out in enumerate(channels):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks[f"layer{len(blocks) + 1}"] = Residual(
                    c_in, c_out, stride, norm, activation, shortcut=shortcut, preact=preact,
                    skipinit=skipinit, position=norm_position,
                )
                c_in = c_out
        self.blocks = nn.Sequential(blocks)
        # Pre-activation nets end with norm -> act (the last block's output is not normalized).
        self.final = (
            nn.Sequential(make_norm(norm, c_in), make_activation(activation))
            if preact else nn.Identity()
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c_in, num_classes)
        if keeps_torch_init(init):  # He et al.: Kaiming normal (fan_out), as torchvision's ResNets
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        init_weights(self, init)
        if zero_init_residual:
            with torch.no_grad():
                for block in list(self.blocks)[1:]:
                    gamma = getattr(block.last_norm(), "weight", None)
                    if isinstance(gamma, torch.Tensor):
                        gamma.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.final(self.blocks(x))))

    def nonlinearities(self) -> dict[str, nn.Module]:
        return {name: _first(block, "act") for name, block in self.blocks.named_children()}

    def norm_layers(self) -> dict[str, nn.Module]:
        norms = {name: _first(block, "norm") for name, block in self.blocks.named_children()}
        return {name: n for name, n in norms.items() if not isinstance(n, nn.Identity)}

    def weight_layers(self) -> dict[str, nn.Module]:
        layers = {name: block[0] if isinstance(block, Block) else block.conv1
                  for name, block in self.blocks.named_children()}
        layers["head"] = self.head
        return layers


def _first(block: nn.Module, kind: str) -> nn.Module:
    """The block's first activation (`kind="act"`) or norm (`"norm"`)."""
    return getattr(block, kind) if isinstance(block, Block) else getattr(block, f"{kind}1")
