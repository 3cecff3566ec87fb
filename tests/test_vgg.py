"""VGG backbone: layouts, every configured norm, image sizes, paired weights, clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import choices, part, run_cli
from torch import nn

from normlab.config.validate import ConfigError, validate
from normlab.models.vgg import PRESETS, VGG
from normlab.train import train

SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


@pytest.mark.parametrize("norm", choices("norm"))
@pytest.mark.parametrize("data", list(SHAPES))
def test_vgg_small_builds_and_trains_with_every_norm_on_every_image_size(norm, data):
    torch.manual_seed(0)
    shape = SHAPES[data]
    model = VGG(shape, 10, preset="vgg_small", norm=part("norm", norm), dropout=0.1)
    x, y = torch.randn(32, *shape), torch.randint(0, 10, (32,))  # ghost_bn: 2 x 16
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    if norm != "none":
        assert not isinstance(model.blocks.layer1.norm, nn.Identity)


def test_layout_names_pools_and_head_follow_the_config():
    model = VGG((3, 32, 32), 10, preset="vgg11", norm=part("norm", "bn"))
    convs = [c for c in PRESETS["vgg11"] if c != "M"]
    assert list(model.nonlinearities()) == [f"layer{i + 1}" for i in range(len(convs))]
    assert list(model.weight_layers()) == [*model.nonlinearities(), "head"]
    assert [b.conv.out_channels for b in model.blocks] == convs
    pooled = [hasattr(b, "pool") for b in model.blocks]
    assert pooled == [True, True, False, True, False, True, False, True]
    assert model.blocks.layer3.norm.num_features == 256
    assert model.head.in_features == 512  # 32 / 2**5 = 1 pixel
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    small = VGG((1, 28, 28), 7, config=[4, "M", 8])
    assert small.head.in_features == 8 * 14 * 14
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, 7)


@pytest.mark.parametrize("init", ["default", "xavier_normal"])
def test_same_seed_same_conv_weights_whatever_the_norm(init):
    built = {}
    for norm in choices("norm"):
        torch.manual_seed(3)
        model = VGG((1, 8, 8), 10, norm=part("norm", norm), init=part("init", init))
        built[norm] = {n: m.weight.detach().clone() for n, m in model.weight_layers().items()}
    reference = built.pop("none")
    for norm, weights in built.items():
        for name, weight in reference.items():
            assert torch.equal(weight, weights[name]), (norm, name)


def test_too_deep_preset_is_one_clear_error():
    with pytest.raises(ValueError, match=r"model.preset=vgg11 pools 5 times but the input is 8x8"):
        VGG((1, 8, 8), 10, preset="vgg11")
    with pytest.raises(ValueError, match=r"model.preset='vgg12' is not valid; choose one of"):
        VGG((3, 32, 32), 10, preset="vgg12")
    with pytest.raises(ValueError, match=r"must follow a conv"):
        VGG((3, 32, 32), 10, config=["M", 8])
    with pytest.raises(ValueError, match=r"'x' is neither a channel count"):
        VGG((3, 32, 32), 10, config=[8, "x"])
    with pytest.raises(ValueError, match=r"model=vgg needs images"):
        VGG((20,), 10)
    VGG((1, 28, 28), 10, config=[4, "M", 4, "M", 4, "M", 4, "M"])  # 28 -> 1: fits


def test_validation_names_preset_and_data(make_cfg):
    validate(make_cfg("model=vgg", "model.preset=vgg11", "data=cifar10"))
    with pytest.raises(ConfigError) as error:
        validate(make_cfg("model=vgg", "model.preset=vgg11"))
    message = str(error.value)
    assert "model.preset=vgg11" in message and "data=digits" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"model.config=\[8, 'M', 8, 'M', 8, 'M', 8, 'M'\]"):
        validate(make_cfg("model=vgg", "model.config=[8,M,8,M,8,M,8,M]"))


@pytest.mark.slow  # a subprocess sweep or import-heavy CLI run: CI runs it with -m slow
def test_cli_too_deep_preset_is_one_line_without_traceback(tmp_path):
    proc = run_cli("model=vgg", "model.preset=vgg11", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2  # a config error: refused before any work
    assert "Traceback" not in proc.stderr
    assert "normlab: error: model.preset=vgg11 pools 5 times" in proc.stderr


def test_vgg_trains_on_digits_end_to_end(make_cfg):
    cfg = make_cfg(
        "model=vgg", "norm=bn", "trainer.max_epochs=3", "~logger", "~callbacks", "lr=0.003"
    )
    result = train(cfg)
    assert result["status"] == "ok"
    assert result["val/acc"] > 0.5  # 10 classes: chance is 0.1


@pytest.mark.parametrize("position", ["pre", "post"])
def test_norm_position_reaches_every_vgg_block(position):
    model = VGG((1, 8, 8), 10, norm=part("norm", "bn"), norm_position=position)
    order = ["conv", "norm", "act"] if position == "pre" else ["conv", "act", "norm"]
    for block in model.blocks:
        assert [name for name, _ in block.named_children()][:3] == order
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
