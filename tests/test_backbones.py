import math

import pytest
import torch
from torch import nn

from normlab.models.backbones import CNN, MLP, init_weights, make_norm

NORMS = ["none", "bn", "custom_bn"]


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: layer.weight.detach().clone() for n, layer in model.weight_layers().items()}


@pytest.mark.parametrize("cls", [MLP, CNN])
@pytest.mark.parametrize("init", ["default", "normal", "he_uniform"])
def test_same_seed_same_weights_whatever_the_norm(cls, init):
    built = {}
    for norm in NORMS:
        torch.manual_seed(7)
        built[norm] = weights_of(cls((1, 8, 8), 10, norm=norm, init=init))
    for norm in NORMS[1:]:
        for name, w in built["none"].items():
            assert torch.equal(w, built[norm][name]), (norm, name)


def test_mlp_layout_follows_the_lecture():
    model = MLP((1, 28, 28), 10, hidden_sizes=[32, 32], norm="bn", activation="relu", dropout=0.3)
    assert list(model.nonlinearities()) == ["layer1", "layer2"]
    block = model.blocks.layer1
    assert [type(m) for m in block] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout]
    assert block.linear.in_features == 784 and model.head.out_features == 10
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 10)


def test_cnn_normalizes_per_channel_and_pools_to_a_head():
    model = CNN((3, 32, 32), 10, channels=[8, 16], norm="bn")
    assert isinstance(model.blocks.layer1.norm, nn.BatchNorm2d)
    assert model.blocks.layer1.norm.num_features == 8
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert CNN((1, 8, 8), 10)(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_norm_options_reach_the_layer():
    layer = make_norm({"name": "bn", "eps": 1e-3, "momentum": None}, 5, 1)
    assert layer.eps == 1e-3 and layer.momentum is None
    assert isinstance(make_norm({"name": "none"}, 5, 1), nn.Identity)


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
    model = MLP((1, 28, 28), 10, hidden_sizes=[256], init=init)
    w = model.blocks.layer1.linear.weight
    assert w.std().item() == pytest.approx(expected_std(784, 256), rel=0.05)
    assert torch.count_nonzero(w.new_tensor(model.blocks.layer1.linear.bias.detach())) == 0


def test_zeros_init_makes_every_unit_identical():
    model = MLP((1, 8, 8), 10, init="zeros")
    assert all(
        torch.count_nonzero(p) == 0
        for n, p in model.named_parameters()
        if "linear" in n or n.startswith("head")
    )


def test_normal_init_uses_its_std():
    torch.manual_seed(0)
    model = MLP((1, 28, 28), 10, hidden_sizes=[128], init={"name": "normal", "std": 0.05})
    assert model.blocks.layer1.linear.weight.std().item() == pytest.approx(0.05, rel=0.05)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"norm": "foo"}, "norm='foo' is not valid; choose one of: none, bn, custom_bn"),
        ({"activation": "gelu"}, "activation='gelu' is not valid; choose one of: relu, sigmoid"),
        ({"init": "orthogonal"}, "init='orthogonal' is not valid; choose one of: default"),
        ({"hidden_sizes": []}, "model.hidden_sizes is empty"),
    ],
)
def test_bad_choices_name_the_valid_ones(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        MLP((1, 8, 8), 10, **kwargs)


def test_cnn_refuses_flat_data():
    with pytest.raises(ValueError, match="model=cnn needs images"):
        CNN((64,), 10)


def test_init_skips_norm_layers():
    model = MLP((1, 8, 8), 10, norm="bn")
    init_weights(model, "zeros")
    assert torch.equal(model.blocks.layer1.norm.weight, torch.ones(32))
