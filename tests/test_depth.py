"""Depth: deep MLPs (model.depth/width), CIFAR ResNets, and the depth probe (gradient profile,
block output scale, representation rank) -- its numbers equal a hand computation, and training is
bit-identical with and without it."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_identical, choices, part
from test_ics import final_state
from torch import nn

from normlab.callbacks.depth import DepthProbe, depth_probe, depth_summary, mean_cosine, stable_rank
from normlab.models.backbones import MLP
from normlab.models.resnet import Residual, ResNet
from normlab.results.runs import read_scalars

# ---------------------------------------------------------------- the numbers


def test_stable_rank_of_known_matrices():
    h = torch.zeros(5, 4)
    h[0, 0], h[1, 1], h[2, 2] = 3.0, 2.0, 1.0  # singular values 3, 2, 1
    assert stable_rank(h) == pytest.approx((9 + 4 + 1) / 9)
    assert stable_rank(torch.eye(6)) == pytest.approx(6.0)
    u, v = torch.randn(7, 1), torch.randn(1, 12)
    assert stable_rank(u @ v) == pytest.approx(1.0)  # rank one
    assert stable_rank(torch.randn(3, 2, 4, 4)) == pytest.approx(
        stable_rank(torch.randn(3, 2, 4, 4).reshape(3, -1)), rel=10)  # images flatten per sample
    assert stable_rank(torch.zeros(4, 3)) == 0.0


def test_stable_rank_equals_singular_values_both_orientations():
    for shape in [(10, 4), (4, 10)]:
        h = torch.randn(*shape)
        s = torch.linalg.svdvals(h.double())
        assert stable_rank(h) == pytest.approx((s.pow(2).sum() / s[0] ** 2).item())


def test_cosine_of_identical_and_orthogonal_features():
    row = torch.randn(1, 9)
    assert mean_cosine(row.repeat(5, 1)) == pytest.approx(1.0)
    assert mean_cosine(3.0 * row.repeat(5, 1)) == pytest.approx(1.0)  # scale-free
    assert mean_cosine(torch.eye(6)) == pytest.approx(0.0, abs=1e-12)
    assert mean_cosine(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-1.0)
    h = torch.randn(6, 5)
    u = F.normalize(h.double(), dim=1)
    by_hand = (u @ u.T)[~torch.eye(6, dtype=torch.bool)].mean().item()
    assert mean_cosine(h) == pytest.approx(by_hand)


class Wrapped(nn.Module):
    """A backbone as the callbacks see it (the ClassifierModule's probe methods)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone(x)

    def weight_layers(self):
        return self.backbone.weight_layers()

    def nonlinearities(self):
        return self.backbone.nonlinearities()


def test_gradient_profile_equals_autograd_by_hand_on_a_tiny_net():
    torch.manual_seed(0)
    backbone = MLP((6,), 3, depth=3, width=5, norm=part("norm", "bn"), dropout=0.3)
    model = Wrapped(backbone)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    metrics = depth_probe(model, x, y)

    twin = copy.deepcopy(backbone).train()
    for module in twin.modules():  # the probe runs without dropout, on batch statistics
        if isinstance(module, nn.Dropout):
            module.eval()
    hidden = {}
    out = twin.flatten(x)
    for name, block in twin.blocks.named_children():
        out = block(out)
        hidden[name] = out
    F.cross_entropy(twin.head(out), y).backward()
    layers = {**{n: b[0] for n, b in twin.blocks.named_children()}, "head": twin.head}
    assert set(layers) == {"layer1", "layer2", "layer3", "head"}
    for name, layer in layers.items():
        g = layer.weight.grad.norm().item()
        assert metrics[f"gradprofile/{name}/norm"] == pytest.approx(g, rel=1e-5)
        rel = g / layer.weight.norm().item()
        assert metrics[f"gradprofile/{name}/rel"] == pytest.approx(rel, rel=1e-5)
    for name, h in hidden.items():
        assert metrics[f"scale/{name}/std"] == pytest.approx(h.std().item(), rel=1e-5)
        assert metrics[f"rank/{name}/stable_rank"] == pytest.approx(stable_rank(h), rel=1e-6)
        assert metrics[f"rank/{name}/cosine"] == pytest.approx(mean_cosine(h), rel=1e-6)
    # ... and left no .grad, BN statistics or mode behind
    assert all(p.grad is None for p in backbone.parameters())
    assert backbone.training


def test_depth_summary_numbers():
    series = {
        "gradprofile/layer1/norm": {0: 1.0, 5: 2.0, 9: 3.0},
        "rank/layer1/cosine": {0: 0.5, 9: 0.9},
        "rank/layer2/stable_rank": {0: 4.0},
    }
    summary = depth_summary(series)
    assert summary["layer1"] == {"grad_norm_init": 1.0, "grad_norm_end": 3.0,
                                 "cosine_init": 0.5, "cosine_end": 0.9}
    assert summary["layer2"] == {"stable_rank_init": 4.0, "stable_rank_end": 4.0}


# ---------------------------------------------------------------- leaves no trace


def test_training_is_bit_identical_with_and_without_the_depth_probe(tmp_path):
    plain = final_state(tmp_path / "plain", [], 12)
    probe = DepthProbe(every_n_steps=1, probe_size=64, output_dir=tmp_path / "probed")
    probed = final_state(tmp_path / "probed", [probe], 12)
    scalars = read_scalars(tmp_path / "probed", "gradprofile/layer1/norm")
    assert sorted(scalars["gradprofile/layer1/norm"]) == list(range(13))  # 0..11, and the end
    assert_identical(probed, plain)
    summary = probe.depth_summary()
    assert {"grad_norm_init", "stable_rank_init", "cosine_init"} <= set(summary["layer1"])


# ---------------------------------------------------------------- deep MLPs


def test_mlp_depth_and_width():
    mlp = MLP((8,), 3, depth=20, width=7)
    assert len(mlp.blocks) == 20 and list(mlp.nonlinearities())[-1] == "layer20"
    assert all(block[0].out_features == 7 for block in mlp.blocks)
    assert [b[0].out_features for b in MLP((8,), 3, hidden_sizes=(9, 4), depth=3).blocks] == [9] * 3
    assert [b[0].out_features for b in MLP((8,), 3, hidden_sizes=(9, 4), width=5).blocks] == [5, 5]
    assert [b[0].out_features for b in MLP((8,), 3, hidden_sizes=(9, 4)).blocks] == [9, 4]
    with pytest.raises(ValueError, match="model.depth=0"):
        MLP((8,), 3, depth=0, width=4)


# ---------------------------------------------------------------- ResNets


@pytest.mark.parametrize("preset, millions, blocks", [
    ("resnet20", 0.27, 9), ("resnet32", 0.46, 15), ("resnet56", 0.85, 27),
])
def test_resnet_parameter_counts_and_shapes_match_he_et_al(preset, millions, blocks):
    model = ResNet((3, 32, 32), 10, preset=preset, norm=part("norm", "bn"))
    count = sum(p.numel() for p in model.parameters())
    assert round(count / 1e6, 2) == millions  # He et al. 2016, Table 6
    assert len(model.nonlinearities()) == blocks + 1  # stem + blocks
    x = torch.randn(2, 3, 32, 32)
    shapes = {}
    hooks = [b.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, o.shape))
             for n, b in model.blocks.named_children()]
    assert model(x).shape == (2, 10)
    for hook in hooks:
        hook.remove()
    n = blocks // 3
    assert shapes["layer1"] == (2, 16, 32, 32)
    assert shapes[f"layer{1 + n}"] == (2, 16, 32, 32)
    assert shapes[f"layer{2 + n}"] == (2, 32, 16, 16)
    assert shapes[f"layer{1 + 3 * n}"] == (2, 64, 8, 8)


def test_resnet_depth_wins_over_preset_and_bad_depths_are_refused():
    assert len(ResNet((1, 8, 8), 10, depth=8).nonlinearities()) == 4
    with pytest.raises(ValueError, match="6n \\+ 2"):
        ResNet((1, 8, 8), 10, depth=21)
    with pytest.raises(ValueError, match="model.shortcut"):
        ResNet((1, 8, 8), 10, shortcut="C")


def test_option_b_adds_projections_option_a_has_none():
    a = ResNet((3, 32, 32), 10, norm=part("norm", "bn"), shortcut="A")
    b = ResNet((3, 32, 32), 10, norm=part("norm", "bn"), shortcut="B")
    extra = sum(p.numel() for p in b.parameters()) - sum(p.numel() for p in a.parameters())
    assert extra == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)  # two 1x1 convs + their BN


@pytest.mark.parametrize("norm", choices("norm"))
@pytest.mark.parametrize("preact, position", [(False, "pre"), (True, "pre"), (False, "post")])
def test_every_norm_and_position_works_in_a_resnet(norm, preact, position):
    torch.manual_seed(0)
    model = ResNet((1, 8, 8), 10, depth=8, norm=part("norm", norm), preact=preact,
                   norm_position=position).train()
    out = model(torch.randn(16, 1, 8, 8))  # ghost BN's ghost batch is 16
    assert out.shape == (16, 10) and torch.isfinite(out).all()
    assert list(model.nonlinearities()) == ["layer1", "layer2", "layer3", "layer4"]
    assert list(model.weight_layers()) == ["layer1", "layer2", "layer3", "layer4", "head"]


def test_same_seed_same_convs_whatever_the_norm():
    def convs(norm):
        torch.manual_seed(3)
        model = ResNet((1, 8, 8), 10, depth=14, norm=part("norm", norm) if norm else None)
        return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]

    reference = convs(None)
    for norm in ("bn", "gn", "ln"):
        assert_identical(convs(norm), reference)


def test_zero_init_residual_and_skipinit_start_every_block_as_the_identity():
    x = torch.randn(4, 16, 8, 8)
    zero = ResNet((1, 8, 8), 10, depth=8, norm=part("norm", "bn"), zero_init_residual=True)
    block = zero.blocks.layer2
    assert isinstance(block, Residual) and torch.all(block.norm2.weight == 0)
    assert torch.equal(block(x), torch.relu(x))
    skip = ResNet((1, 8, 8), 10, depth=8, skipinit=True)
    alphas = [b.alpha for b in list(skip.blocks)[1:]]
    assert len(alphas) == 3 and all(a.requires_grad and a.item() == 0 for a in alphas)
    assert torch.equal(skip.blocks.layer2(x), torch.relu(x))
    loss = skip(torch.randn(4, 1, 8, 8)).logsumexp(1).sum()
    loss.backward()
    assert alphas[0].grad is not None  # the scalar learns


# ---------------------------------------------------------------- through train()


def test_a_run_records_depth_numbers_and_tags(make_cfg, tmp_path):
    from normlab.train import train

    cfg = make_cfg("model.depth=4", "model.width=16", "trainer.max_steps=3",
                   "trainer.max_epochs=1", "callbacks.depth.every_n_steps=2")
    result = train(cfg)
    depth = json.loads((tmp_path / "metrics.json").read_text())["depth"]
    assert result["depth"] == depth
    assert [k for k in depth if k.startswith("layer")] == ["layer1", "layer2", "layer3", "layer4"]
    for layer in ("layer1", "layer4"):
        for key in ("grad_norm_init", "stable_rank_init", "cosine_init", "scale_std_init"):
            assert math.isfinite(depth[layer][key])
    assert "grad_norm_init" in depth["head"]
    tags = read_scalars(tmp_path, "")
    for tag in ("gradprofile/layer1/norm", "gradprofile/layer1/rel", "scale/layer1/std",
                "rank/layer1/stable_rank", "rank/layer1/cosine"):
        assert sorted(tags[tag]) == [0, 2, 3], tag


# ---------------------------------------------------------------- figures


def fake_sweep(root, grid, layers=6, make=lambda params, i: 1.0):
    """Job dirs with metrics.json "depth" numbers and Hydra's overrides.yaml, one per grid point."""
    import yaml

    for job, params in enumerate(grid):
        d = root / str(job)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump([f"{k}={v}" for k, v in params.items()]))
        depth = {f"layer{i}": {
            "grad_norm_init": make(params, i), "grad_norm_end": 1.0,
            "cosine_init": 0.1 * i / layers,
            "stable_rank_init": float(layers - i + 1)} for i in range(1, layers + 1)}
        (d / "metrics.json").write_text(json.dumps(
            {"status": "ok", "test/acc": 0.5, "val/loss": 1.0, "depth": depth}))
    return root


@pytest.mark.parametrize("experiment, grid", [
    ("vanishing", [{"activation": a, "init": i, "norm": n, "seed": s} for a in ("sigmoid", "relu")
                   for i in ("default", "he_normal") for n in ("none", "bn") for s in (0, 1)]),
    ("explosion", [{"model": m, "model.depth": d, "norm": n, "seed": s} for m in ("mlp", "resnet")
                   for d in (8, 14) for n in ("bn", "none") for s in (0, 1)]),
    ("rank", [{"activation": a, "norm": n, "seed": s} for a in ("identity", "relu")
              for n in ("none", "bn") for s in (0, 1)]),
    ("resnet", [{"norm": n, "model.skipinit": k, "seed": s} for n in ("none", "bn")
                for k in ("false", "true") for s in (0, 1)]),
])
def test_depth_script_draws_each_experiment(tmp_path, capsys, experiment, grid):
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("depth_script", ROOT / "scripts" / "depth.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    layers = 12 if experiment == "rank" else 6
    sweep = fake_sweep(tmp_path / "sweep", grid, layers,
                       make=lambda p, i: 2.0 ** (int(p.get("model.depth", 6)) - i))
    out = tmp_path / "fig.png"
    assert script.main([experiment, str(sweep), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    table = capsys.readouterr().out
    assert table.startswith("|") and f"({len(grid)} runs)" in table
    if experiment == "explosion":  # first-layer gradient 2**(depth - 1): growth 2 per layer
        assert "| 2.000 |" in table


def test_sweep_figures_for_the_landing_page(tmp_path):
    from normlab.results.depth import sweep_figures

    sweep = fake_sweep(tmp_path, [{"norm": n, "seed": s} for n in ("none", "bn") for s in (0, 1)])
    figures = sweep_figures(sweep)
    assert set(figures) == {"comparison/gradient_profile", "comparison/rank"}
    assert sweep_figures(tmp_path / "empty") == {}


@pytest.mark.parametrize("preact, shortcut, position", [
    (False, "A", "pre"), (False, "B", "pre"), (True, "A", "pre"), (False, "A", "post"),
])
def test_batchnorm_folds_into_a_resnet_without_changing_its_function(preact, shortcut, position):
    from normlab.nn import fold_batchnorm

    torch.manual_seed(0)
    model = ResNet((1, 8, 8), 10, depth=8, norm=part("norm", "bn"), preact=preact,
                   shortcut=shortcut, norm_position=position, skipinit=True)
    with torch.no_grad():
        for block in list(model.blocks)[1:]:
            block.alpha.fill_(0.5)
        model.train()(torch.randn(64, 1, 8, 8))  # running statistics away from 0 / 1
    x = torch.randn(5, 1, 8, 8)
    folded = fold_batchnorm(model.eval())
    assert torch.allclose(folded(x), model(x), atol=1e-5)
    remaining = [m for m in folded.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(remaining) < len(model.norm_layers()) * 2  # most of them folded


def test_stable_rank_of_a_diverged_batch_is_nan_not_an_error():
    import math

    from normlab.callbacks.depth import stable_rank

    h = torch.ones(8, 5)
    h[0, 0] = float("inf")
    assert math.isnan(stable_rank(h))
