import math

import pytest
import torch
from conftest import choices, part
from torch import nn

from normlab.models.backbones import CNN, MLP, init_weights


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: layer.weight.detach().clone() for n, layer in model.weight_layers().items()}


@pytest.mark.parametrize("cls", [MLP, CNN])
@pytest.mark.parametrize("init", ["default", "normal", "he_uniform"])
def test_same_seed_same_weights_whatever_the_norm(cls, init):
    built = {}
    for norm in choices("norm"):
        torch.manual_seed(7)
        model = cls((1, 8, 8), 10, norm=part("norm", norm), init=part("init", init))
        built[norm] = weights_of(model)
    for norm, weights in built.items():
        for name, w in built["none"].items():
            assert torch.equal(w, weights[name]), (norm, name)


def test_mlp_layout_follows_the_lecture():
    model = MLP((1, 28, 28), 10, hidden_sizes=[32, 32], norm=part("norm", "bn"), dropout=0.3)
    assert list(model.nonlinearities()) == ["layer1", "layer2"]
    block = model.blocks.layer1
    assert [type(m).__name__ for m in block] == ["Linear", "TorchBatchNorm", "ReLU", "Dropout"]
    assert block.linear.in_features == 784 and model.head.out_features == 10
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 10)


def test_cnn_normalizes_per_channel_and_pools_to_a_head():
    model = CNN((3, 32, 32), 10, channels=[8, 16], norm=part("norm", "bn"))
    x = torch.randn(2, 3, 32, 32)
    z = model.blocks.layer1.conv(x)
    torch.testing.assert_close(model.blocks.layer1.norm(z), nn.BatchNorm2d(8)(z))
    assert model(x).shape == (2, 10)
    assert CNN((1, 8, 8), 10)(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_norm_options_reach_the_layer():
    layer = part("norm", "bn", eps=1e-3, momentum=None)(5)
    assert layer.eps == 1e-3 and layer.momentum is None
    assert isinstance(part("norm", "none")(5), nn.Identity)


@pytest.mark.parametrize(
    ("init", "expected_std"),
    [
        ("he_normal", lambda fan_in, fan_out: math.sqrt(2 / fan_in)),
        ("xavier_normal", lambda fan_in, fan_out: math.sqrt(2 / (fan_in + fan_out))),
        ("he_uniform", lambda fan_in, fan_out: math.sqrt(2 / fan_in)),
        ("xavier_uniform", lambda fan_in, fan_out: math.sqrt(2 / (fan_in + fan_out))),
    ],
)
def test_init_schemes_have_their_variance(init, expected_std):
    torch.manual_seed(0)
    model = MLP((1, 28, 28), 10, hidden_sizes=[256], init=part("init", init))
    w = model.blocks.layer1.linear.weight
    assert w.std().item() == pytest.approx(expected_std(784, 256), rel=0.05)
    assert torch.count_nonzero(model.blocks.layer1.linear.bias.detach()) == 0


def test_he_init_takes_the_leaky_relu_slope_from_the_activation(make_cfg):
    from normlab.models.from_config import component

    cfg = make_cfg("init=he_normal", "activation=leaky_relu", "activation.negative_slope=0.5")
    torch.manual_seed(0)
    weight = torch.empty(256, 4096)
    component(cfg, "init")(weight)
    assert weight.std().item() == pytest.approx(math.sqrt(2 / (1 + 0.25) / 4096), rel=0.02)


def test_orthogonal_init_gives_orthonormal_rows():
    model = MLP((1, 8, 8), 10, hidden_sizes=[32], init=part("init", "orthogonal"))
    w = model.blocks.layer1.linear.weight.detach()
    torch.testing.assert_close(w @ w.T, torch.eye(32), atol=1e-5, rtol=0)


def test_zeros_init_makes_every_unit_identical():
    model = MLP((1, 8, 8), 10, init=part("init", "zeros"))
    assert all(
        torch.count_nonzero(p) == 0
        for n, p in model.named_parameters()
        if "linear" in n or n.startswith("head")
    )


def test_normal_init_uses_its_std():
    torch.manual_seed(0)
    model = MLP((1, 28, 28), 10, hidden_sizes=[128], init=part("init", "normal", std=0.05))
    assert model.blocks.layer1.linear.weight.std().item() == pytest.approx(0.05, rel=0.05)


def test_a_user_init_function_is_applied_to_every_weight_tensor():
    seen = []

    def my_init_(tensor):
        seen.append(tuple(tensor.shape))
        return tensor.fill_(0.5)  # in place on a leaf that requires grad: init runs under no_grad

    model = CNN((1, 8, 8), 10, channels=[4, 6], init=my_init_)
    assert seen == [(4, 1, 3, 3), (6, 4, 3, 3), (10, 6)]
    assert torch.all(model.head.weight == 0.5) and torch.all(model.head.bias == 0)


@pytest.mark.parametrize("activation", choices("activation"))
def test_every_activation_is_a_fresh_module_per_block(activation):
    model = MLP((1, 8, 8), 10, activation=part("activation", activation))
    acts = list(model.nonlinearities().values())
    assert len({id(a) for a in acts}) == len(acts) == 2
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_an_activation_module_instance_is_copied_per_block():
    model = MLP((1, 8, 8), 10, activation=nn.LeakyReLU(0.3))
    first, second = model.nonlinearities().values()
    assert first is not second and first.negative_slope == second.negative_slope == 0.3


def test_empty_hidden_sizes_are_refused():
    with pytest.raises(ValueError, match="model.hidden_sizes is empty"):
        MLP((1, 8, 8), 10, hidden_sizes=[])


def test_cnn_refuses_flat_data():
    with pytest.raises(ValueError, match="model=cnn needs images"):
        CNN((64,), 10)


def test_init_skips_norm_layers():
    model = MLP((1, 8, 8), 10, norm=part("norm", "bn"))
    init_weights(model, torch.nn.init.zeros_)
    assert torch.equal(model.blocks.layer1.norm.weight, torch.ones(32))
