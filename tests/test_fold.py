"""fold_batchnorm: the folded copy computes what the eval-mode model computes, minus the BNs."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from conftest import part
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

import normlab.nn as ours
from normlab.models.backbones import CNN, MLP
from normlab.nn import fold_batchnorm
from normlab.nn.fold import FoldWarning


class Block(nn.Module):
    """Shaped like normlab's backbone blocks: children linear|conv, norm, act, drop."""

    def __init__(self, weight: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        setattr(self, "linear" if isinstance(weight, nn.Linear) else "conv", weight)
        self.norm = norm
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.weight_layer = weight.__class__.__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.linear if hasattr(self, "linear") else self.conv
        return self.drop(self.act(self.norm(weight(x))))


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 8, bias=False),
        ours.BatchNorm1d(8),
        nn.Tanh(),
        nn.BatchNorm1d(8),  # follows an activation: folds into the next Linear
        nn.Linear(8, 5),
        ours.BatchNorm1d(5, affine=False),
        nn.Linear(5, 5),
        nn.BatchNorm1d(5, track_running_stats=False),  # no running stats: stays
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.BatchNorm2d(3),  # first layer, nothing to fold into: stays
        nn.Conv2d(3, 4, 3, padding=1),
        ours.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False, groups=2),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
        ours.BatchNorm1d(4),
    )


class Blocks(nn.Module):
    """Nested blocks (as in normlab's MLP/CNN) including a Conv1d one and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                layer1=Block(nn.Conv1d(2, 4, 3, padding=1), ours.BatchNorm1d(4)),
                layer2=Block(nn.Conv1d(4, 4, 3, padding=1, bias=False), nn.BatchNorm1d(4)),
            )
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            OrderedDict(
                layer3=Block(nn.Linear(28, 6), nn.BatchNorm1d(6, affine=False)),
                layer4=Block(nn.Linear(6, 6, bias=False), ours.BatchNorm1d(6)),
            )
        )
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.classifier(self.flatten(self.features(x))))


MODELS = {
    "mlp": (mlp, (16, 6), 4),
    "cnn": (cnn, (8, 3, 6, 6), 3),
    "blocks": (Blocks, (16, 2, 7), 4),
}


def trained(factory, input_shape) -> nn.Module:
    """A model whose BNs have non-trivial running statistics and affine parameters."""
    torch.manual_seed(0)
    model = factory()
    with torch.no_grad():
        for module in model.modules():
            if ours.has_running_stats(module) and module.affine:
                module.weight.uniform_(0.5, 2.0)
                module.bias.normal_()
        for _ in range(5):
            model(torch.randn(input_shape) * 2 + 1)
    return model


def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if ours.has_running_stats(m)]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.filterwarnings("ignore::normlab.nn.fold.FoldWarning")
def test_folded_equals_eval_model(name):
    factory, input_shape, expected_folds = MODELS[name]
    model = trained(factory, input_shape)
    folded = fold_batchnorm(model)
    assert not folded.training and not any(m.training for m in folded.modules())
    assert len(batch_norms(model)) - len(batch_norms(folded)) == expected_folds

    model.eval()
    for _ in range(3):
        x = torch.randn(input_shape) * 2 + 1
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::normlab.nn.fold.FoldWarning")
def test_folding_targets_and_skips():
    model = trained(mlp, (16, 6))
    folded = fold_batchnorm(model)
    kinds = [type(m) for m in folded]
    assert kinds[1] is nn.Identity and kinds[4] is nn.Identity and kinds[8] is nn.Identity
    assert kinds[6] is nn.Identity  # after Tanh: folded into the Linear after it
    assert kinds[10] is nn.BatchNorm1d  # track_running_stats=False
    assert folded[3].bias is not None  # created for the bias-free Linear
    assert folded[3].bias.shape == (8,)

    cnn_folded = fold_batchnorm(trained(cnn, (8, 3, 6, 6)))
    assert type(cnn_folded[0]) is nn.BatchNorm2d  # nothing before it

    blocks = fold_batchnorm(trained(Blocks, (16, 2, 7)))
    for block in (*blocks.features, *blocks.classifier):
        assert isinstance(block.norm, nn.Identity)
        assert isinstance(block.act, nn.ReLU) and isinstance(block.drop, nn.Dropout)


@pytest.mark.filterwarnings("ignore::normlab.nn.fold.FoldWarning")
@pytest.mark.parametrize("name", list(MODELS))
def test_original_model_is_untouched(name):
    factory, input_shape, _ = MODELS[name]
    model = trained(factory, input_shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds_before = [type(m) for m in model.modules()]
    fold_batchnorm(model)
    assert model.training  # still in training mode
    assert [type(m) for m in model.modules()] == kinds_before
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.filterwarnings("ignore::normlab.nn.fold.FoldWarning")
def test_float64_fold_is_exact_to_rounding():
    model = trained(cnn, (8, 3, 6, 6)).double()
    folded = fold_batchnorm(model)
    model.eval()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


# ---- normlab's backbones, both positions; torch's fusers as the reference --------------------


def trained_backbone(cls, norm, position, steps=5):
    torch.manual_seed(0)
    model = cls((1, 8, 8), 10, norm=part("norm", norm), norm_position=position)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):  # non-trivial weights, gammas, betas and running statistics
        loss = model(torch.randn(32, 1, 8, 8) * 2 + 1).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("norm", ["bn", "custom_bn"])
@pytest.mark.parametrize("cls", [MLP, CNN])
def test_pre_fold_equals_torch_fusers(cls, norm):
    model = trained_backbone(cls, norm, "pre")
    report: list[str] = []
    folded = fold_batchnorm(model, report)
    for name, block in model.blocks.named_children():
        layer = block[0]
        bn = (
            nn.BatchNorm1d(block.norm.num_features)
            if cls is MLP
            else nn.BatchNorm2d(block.norm.num_features)
        )
        bn.load_state_dict(block.norm.state_dict())
        bn.eval()
        fuse = fuse_linear_bn_eval if cls is MLP else fuse_conv_bn_eval
        reference = fuse(copy.deepcopy(layer), bn)
        mine = getattr(folded.blocks, name)[0]
        torch.testing.assert_close(mine.weight, reference.weight, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.bias, reference.bias, rtol=1e-5, atol=1e-5)
        assert isinstance(getattr(folded.blocks, name).norm, nn.Identity)
    assert report == [
        f"blocks.{n}.norm: folded into blocks.{n}.{'linear' if cls is MLP else 'conv'} (before it)"
        for n in ("layer1", "layer2")
    ]
    x = torch.randn(16, 1, 8, 8) * 2 + 1
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["bn", "custom_bn"])
def test_post_bn_folds_into_the_next_linear(norm):
    model = trained_backbone(MLP, norm, "post")
    report: list[str] = []
    folded = fold_batchnorm(model, report)
    assert report == [
        "blocks.layer1.norm: folded into blocks.layer2.linear (after it)",
        "blocks.layer2.norm: folded into head (after it)",
    ]
    assert not any(isinstance(m, (nn.BatchNorm1d, ours.BatchNorm1d)) for m in folded.modules())
    x = torch.randn(16, 1, 8, 8) * 2 + 1
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_post_bn_folds_into_an_unpadded_conv_only():
    torch.manual_seed(0)

    def net(padding):
        return nn.Sequential(
            nn.Conv2d(2, 4, 3),
            nn.ReLU(),
            nn.BatchNorm2d(4),
            nn.Dropout(0.2),
            nn.Conv2d(4, 3, 3, padding=padding),
        )

    for padding, folds in ((0, True), (1, False)):
        model = net(padding)
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(8, 2, 9, 9) * 2 + 1)
            model[2].weight.uniform_(-2, 2)  # negative gammas too
            model[2].bias.normal_()
        model.eval()
        report: list[str] = []
        if folds:
            folded = fold_batchnorm(model, report)
        else:
            with pytest.warns(FoldWarning, match="exact only with padding=0"):
                folded = fold_batchnorm(model, report)
        assert isinstance(folded[2], nn.Identity) == folds, report
        x = torch.randn(4, 2, 9, 9) * 2 + 1
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_cnn_post_bn_stays_with_its_reason():
    model = trained_backbone(CNN, "bn", "post")
    report: list[str] = []
    with pytest.warns(FoldWarning):
        folded = fold_batchnorm(model, report)
    # the blocks pool after the norm: max-pooling does not commute with a negative BN scale
    assert report == [
        f"blocks.{n}.norm: left in place: no Linear/Conv follows it directly (MaxPool2d comes next)"
        for n in ("layer1", "layer2")
    ]
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["ln", "gn", "rms"])
@pytest.mark.parametrize("cls", [MLP, CNN])
def test_per_sample_norms_are_left_alone_with_a_reason(cls, norm):
    model = trained_backbone(cls, norm, "pre")
    report: list[str] = []
    with pytest.warns(FoldWarning, match="normalizes each sample by its own statistics"):
        folded = fold_batchnorm(model, report)
    assert len(report) == 2 and all("left in place" in line for line in report)
    assert [type(b.norm) for b in folded.blocks] == [type(b.norm) for b in model.blocks]
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-6, atol=1e-6)
