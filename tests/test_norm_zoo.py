"""The norm zoo (in, frn, evonorm_b0/s0, switchable, mean_only_bn, var_only_bn, iternorm) against
references -- timm's and torch's classes where they exist, the paper's formula written out as a
loop here for the rest -- in training and evaluation, forward and backward, to 1e-5 in float32;
and the weights axis (plain, standardized, weight_norm)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ROOT, compose_cfg, part
from torch import nn

from normlab.config.validate import ConfigError, validate
from normlab.models.from_config import build_backbone
from normlab.nn import BatchNorm, fold_batchnorm
from normlab.nn.mean_only_bn import MeanOnlyBatchNorm
from normlab.nn.var_only_bn import VarOnlyBatchNorm

TOL = {"rtol": 1e-5, "atol": 1e-5}
C = 8


def images(n: int = 6, c: int = C, hw: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, hw, hw, generator=g) * 2 + 0.5).requires_grad_()


def randomize(*modules: nn.Module, seed: int = 1) -> None:
    """The same random parameters, by name, in every module (so they differ from the init)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(modules[0].named_parameters())
    values = {k: torch.rand(p.shape, generator=g) + 0.5 for k, p in params.items()}
    with torch.no_grad():
        for m in modules:
            for k, p in m.named_parameters():
                p.copy_(values[k])


def assert_same_function(ours: nn.Module, ref: nn.Module, x: torch.Tensor, steps: int = 3,
                         names: dict[str, str] | None = None) -> None:
    """Training steps (output, input and parameter gradients, buffers), then evaluation."""
    names = names or {}
    ref_params = dict(ref.named_parameters())
    for step in range(steps):
        xa = (x.detach() + step).requires_grad_()
        xb = xa.detach().clone().requires_grad_()
        ya, yb = ours.train()(xa), ref.train()(xb)
        torch.testing.assert_close(ya, yb, **TOL)
        w = torch.randn_like(ya)
        (ya * w).sum().backward()
        (yb * w).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, **TOL)
        for name, p in ours.named_parameters():
            torch.testing.assert_close(p.grad, ref_params[names.get(name, name)].grad, **TOL)
    for name, buffer in ref.named_buffers():
        if name in dict(ours.named_buffers()):
            torch.testing.assert_close(dict(ours.named_buffers())[name], buffer, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x), **TOL)


# ---- timm and torch references -----------------------------------------------------------------


def test_frn_is_timms_filter_response_norm_tlu():
    from timm.layers import FilterResponseNormTlu2d

    ours, ref = part("norm", "frn")(C), FilterResponseNormTlu2d(C, eps=1e-6)
    randomize(ours, ref)
    assert_same_function(ours, ref, images())


def test_frn_learned_eps_adds_its_absolute_value():
    frn = part("norm", "frn", learned_eps=True)(C)
    with torch.no_grad():
        frn.eps_l.fill_(-0.3)
    x = images()
    nu2 = x.square().mean((2, 3), keepdim=True)
    y = x * torch.rsqrt(nu2 + 1e-6 + 0.3)
    torch.testing.assert_close(frn(x), torch.maximum(y, torch.zeros(())), **TOL)


def test_evonorm_b0_is_timms():
    from timm.layers import EvoNorm2dB0

    ours, ref = part("norm", "evonorm_b0")(C), EvoNorm2dB0(C, eps=1e-3, momentum=0.1)
    randomize(ours, ref)
    assert_same_function(ours, ref, images())


def test_evonorm_s0_is_timms():
    from timm.layers import EvoNorm2dS0

    ours, ref = part("norm", "evonorm_s0", groups=4)(C), EvoNorm2dS0(C, groups=4, eps=1e-5)
    randomize(ours, ref)
    assert_same_function(ours, ref, images())


def test_instance_norm_is_torchs_affine_instance_norm_and_refuses_features():
    ours, ref = part("norm", "in")(C), nn.InstanceNorm2d(C, affine=True)
    randomize(ours, ref)
    assert_same_function(ours, ref, images())
    with pytest.raises(ValueError) as error:
        ours(torch.randn(4, C))
    assert "\n" not in str(error.value) and "model=cnn" in str(error.value)


def test_instance_norm_of_a_1x1_map_is_beta():
    norm = part("norm", "in")(C)
    randomize(norm)
    x = torch.randn(4, C, 1, 1, requires_grad=True)
    y = norm.train()(x)
    torch.testing.assert_close(y, norm.bias.view(1, -1, 1, 1).expand_as(y).detach())
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_in_on_the_mlp_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"Instance Norm normalizes each channel over H, W"):
        validate(compose_cfg(tmp_path, "norm=in"))
    validate(compose_cfg(tmp_path, "norm=in", "model=cnn"))


# ---- the paper's formula, written out ----------------------------------------------------------


def switchable_loop(x, mean_w, var_w, running=None, eps=1e-5):
    """Luo et al. 2019, eq. 2-4, channel by channel and sample by sample."""
    n, c = x.shape[:2]
    out = torch.empty_like(x)
    for i in range(n):
        ln = x[i]
        mu_ln, var_ln = ln.mean(), ln.var(unbiased=False)
        for k in range(c):
            inst = x[i, k]
            mu_in, var_in = inst.mean(), inst.var(unbiased=False)
            if running is None:
                mu_bn, var_bn = x[:, k].mean(), x[:, k].var(unbiased=False)
            else:
                mu_bn, var_bn = running[0][k], running[1][k]
            mu = mean_w[0] * mu_in + mean_w[1] * mu_ln + mean_w[2] * mu_bn
            var = var_w[0] * var_in + var_w[1] * var_ln + var_w[2] * var_bn
            out[i, k] = (inst - mu) / torch.sqrt(var + eps)
    return out


@pytest.mark.parametrize("training", [True, False])
def test_switchable_is_the_papers_mixture(training):
    norm = part("norm", "switchable", affine=False)(C)
    with torch.no_grad():
        norm.mean_logits.copy_(torch.tensor([0.3, -0.5, 1.0]))
        norm.var_logits.copy_(torch.tensor([-1.0, 0.2, 0.4]))
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    running = (norm.running_mean.clone(), norm.running_var.clone())
    x = images()
    y = norm.train(training)(x)
    mean_w, var_w = (torch.softmax(p, 0) for p in (norm.mean_logits, norm.var_logits))
    expected = switchable_loop(x, mean_w, var_w, None if training else running)
    torch.testing.assert_close(y, expected, **TOL)
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), [x, norm.mean_logits, norm.var_logits])
    expected_grads = torch.autograd.grad((expected * w).sum(), [x, norm.mean_logits,
                                                                 norm.var_logits])
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    scalars = norm.scalars()
    assert sum(v for k, v in scalars.items() if k.startswith("mean_")) == pytest.approx(1)
    assert scalars["var_bn"] == pytest.approx(var_w[2].item())


def test_switchable_on_features_mixes_ln_and_bn():
    norm = part("norm", "switchable", affine=False)(C)
    x = torch.randn(16, C) * 3 + 1
    w = torch.softmax(norm.mean_logits[1:], 0)
    expected = switchable_loop(x.view(16, C, 1, 1), torch.cat([torch.zeros(1), w]),
                               torch.cat([torch.zeros(1), w])).view(16, C)
    torch.testing.assert_close(norm.train()(x), expected, **TOL)


def iternorm_loop(x, groups, iterations, eps=1e-5):
    """Huang et al. 2019, Algorithm 1, group by group, returning (x_hat, mean, Sigma^-1/2)."""
    n, c = x.shape[:2]
    d = c // groups
    out, means, wms = torch.empty_like(x), [], []
    for g in range(groups):
        xg = x[:, g * d:(g + 1) * d].transpose(0, 1).reshape(d, -1)  # d x m
        m = xg.shape[1]
        mu = xg.mean(1, keepdim=True)
        xc = xg - mu
        sigma = eps * torch.eye(d) + xc @ xc.T / m
        trace = torch.trace(sigma)
        sn = sigma / trace
        p = torch.eye(d)
        for _ in range(iterations):
            p = 0.5 * (3 * p - torch.linalg.matrix_power(p, 3) @ sn)
        wm = p / torch.sqrt(trace)
        out[:, g * d:(g + 1) * d] = (wm @ xc).reshape(d, n, *x.shape[2:]).transpose(0, 1)
        means.append(mu.view(d))
        wms.append(wm)
    return out, torch.cat(means), torch.stack(wms)


def test_iternorm_is_the_papers_algorithm_in_training_and_evaluation():
    norm = part("norm", "iternorm", groups=2, iterations=5, affine=False)(C)
    x = images()
    y = norm.train()(x)
    expected, mean, wm = iternorm_loop(x, 2, 5)
    torch.testing.assert_close(y, expected, **TOL)
    w = torch.randn_like(y)
    (gx,) = torch.autograd.grad((y * w).sum(), [x])
    (ex,) = torch.autograd.grad((expected * w).sum(), [x])
    torch.testing.assert_close(gx, ex, **TOL)
    torch.testing.assert_close(norm.running_mean, 0.1 * mean.detach(), **TOL)
    running_wm = 0.9 * torch.eye(C // 2) + 0.1 * wm.detach()
    torch.testing.assert_close(norm.running_wm, running_wm, **TOL)
    x2 = images(seed=3).detach()
    with torch.no_grad():
        out = norm.eval()(x2)
        for g in range(2):
            xg = x2[:, g * 4:(g + 1) * 4].transpose(0, 1).reshape(4, -1)
            ref = running_wm[g] @ (xg - norm.running_mean[g * 4:(g + 1) * 4, None])
            torch.testing.assert_close(out[:, g * 4:(g + 1) * 4],
                                       ref.reshape(4, 6, 5, 5).transpose(0, 1), **TOL)


def test_iternorm_whitens_with_enough_iterations():
    norm = part("norm", "iternorm", groups=1, iterations=10, affine=False)(4)
    mix = torch.tensor([[1.0, 0.8, 0.0, 0.1], [0, 1, 0.5, 0], [0, 0, 1, 0.3], [0, 0, 0, 1]])
    y = norm.train()(torch.randn(4096, 4) @ mix).detach()
    torch.testing.assert_close(y.T @ y / y.shape[0], torch.eye(4), atol=2e-2, rtol=0)


def test_bn_halves_compose_to_bn_in_training_and_evaluation():
    mean_only = MeanOnlyBatchNorm(C, affine=False)
    var_only = VarOnlyBatchNorm(C)
    bn = BatchNorm(C)
    randomize(var_only, bn)
    composed = nn.Sequential(mean_only, var_only)
    for step in range(3):
        x = images(seed=step)
        xb = x.detach().clone().requires_grad_()
        y, ref = composed.train()(x), bn.train()(xb)
        torch.testing.assert_close(y, ref, **TOL)
        w = torch.randn_like(y)
        (y * w).sum().backward()
        (ref * w).sum().backward()
        torch.testing.assert_close(x.grad, xb.grad, **TOL)
        torch.testing.assert_close(var_only.weight.grad, bn.weight.grad, **TOL)
    torch.testing.assert_close(mean_only.running_mean, bn.running_mean, **TOL)
    torch.testing.assert_close(var_only.running_var, bn.running_var, **TOL)
    x = images(seed=9).detach()
    torch.testing.assert_close(composed.eval()(x), bn.eval()(x), **TOL)


def test_each_bn_half_is_its_formula():
    x = images().detach()
    mu = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(part("norm", "mean_only_bn")(C).train()(x), x - mu, **TOL)
    torch.testing.assert_close(part("norm", "var_only_bn")(C).train()(x),
                               x / torch.sqrt(var + 1e-5), **TOL)


@pytest.mark.parametrize("name", ["mean_only_bn", "var_only_bn"])
def test_bn_halves_fold_exactly(name):
    from normlab.models.backbones import CNN

    torch.manual_seed(0)
    model = CNN((1, 8, 8), 10, norm=part("norm", name))
    for _ in range(3):
        model.train()(torch.randn(16, 1, 8, 8) * 2 + 1)
    report: list[str] = []
    folded = fold_batchnorm(model, report)
    assert all("folded into" in line for line in report), report
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), **TOL)


@pytest.mark.parametrize(("name", "option", "message"), [
    ("iternorm", {"iterations": 0}, "norm.iterations=0 is out of range"),
    ("iternorm", {"groups": 3}, "norm.groups=3 does not divide"),
    ("evonorm_s0", {"groups": 3}, "norm.groups=3 does not divide"),
    ("switchable", {"momentum": 2.0}, "norm.momentum=2.0 is out of range"),
    ("frn", {"eps": -1.0}, "norm.eps=-1.0 is out of range"),
])
def test_bad_options_are_one_line_naming_the_key(tmp_path, name, option, message):
    cfg = compose_cfg(tmp_path, "model=cnn", f"norm={name}",
                      *[f"norm.{k}={v}" for k, v in option.items()])
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


# ---- the weights axis --------------------------------------------------------------------------


def backbone(tmp_path, *overrides):
    cfg = compose_cfg(tmp_path, "model=cnn", *overrides)
    torch.manual_seed(0)
    return build_backbone(cfg, (1, 8, 8), 10)


def raw_weights(model: nn.Module) -> list[torch.Tensor]:
    from normlab.callbacks.measure import trained_weight

    out = []
    for layer in model.weight_layers().values():
        w = trained_weight(layer)
        if hasattr(layer, "parametrizations") and hasattr(layer.parametrizations.weight,
                                                          "original1"):
            w = layer.weight  # weight norm: g * v / ||v|| is the original weight at init
        out.append(w.detach())
    return out


def test_the_same_seed_gives_the_same_initial_weights_for_every_weights_and_norm(tmp_path):
    reference = raw_weights(backbone(tmp_path, "norm=none"))
    for weights in ("plain", "standardized", "weight_norm"):
        for norm in ("bn", "gn", "switchable"):
            got = raw_weights(backbone(tmp_path, f"norm={norm}", f"weights={weights}"))
            for a, b in zip(reference, got, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_standardized_weights_are_the_formula_on_the_hidden_layers(tmp_path):
    model = backbone(tmp_path, "norm=gn", "weights=standardized")
    for name, layer in model.weight_layers().items():
        w = layer.weight.detach()
        if name == "head":
            assert not hasattr(layer, "parametrizations")
            continue
        raw = layer.parametrizations.weight.original.detach()
        flat = raw.reshape(raw.shape[0], -1)
        mean, std = flat.mean(1, keepdim=True), flat.var(1, unbiased=False, keepdim=True)
        expected = ((flat - mean) / torch.sqrt(std + 1e-5)).reshape(raw.shape)
        torch.testing.assert_close(w, expected, **TOL)


def test_weight_norm_is_torchs(tmp_path):
    plain = backbone(tmp_path, "norm=bn")
    ours = backbone(tmp_path, "norm=bn", "weights=weight_norm")
    ref = copy.deepcopy(plain)
    for layer in ref.weight_layers().values():
        torch.nn.utils.parametrizations.weight_norm(layer)
    x = torch.randn(8, 1, 8, 8)
    torch.testing.assert_close(ours.train()(x), ref.train()(x), **TOL)
    torch.testing.assert_close(ours(x), plain.train()(x), **TOL)  # same function at init
    for layer in ours.weight_layers().values():
        g, v = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
        norm = v.reshape(v.shape[0], -1).norm(dim=1).view(g.shape)
        torch.testing.assert_close(layer.weight, g * v / norm, **TOL)


@pytest.mark.parametrize("weights", ["standardized", "weight_norm"])
def test_fold_folds_into_the_effective_weight(tmp_path, weights):
    model = backbone(tmp_path, "norm=bn", f"weights={weights}")
    model.train()(torch.randn(32, 1, 8, 8) * 2 + 1)
    report: list[str] = []
    folded = fold_batchnorm(model, report)
    assert all("folded into" in line for line in report)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), **TOL)


def test_grad_shift_reads_the_raw_parameter_of_parametrized_weights(tmp_path):
    from normlab.callbacks.measure import grad_shift, trained_weight

    model = backbone(tmp_path, "norm=gn", "weights=standardized")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    weights = {name: trained_weight(layer) for name, layer in model.weight_layers().items()}
    shifts = grad_shift(model, optimizer, weights,
                        lambda: nn.functional.cross_entropy(model(x), y))
    assert set(shifts) == set(weights) and shifts["layer2"][0] > 0


# ---- switchable's scalars, the experiment, its figure ------------------------------------------


def test_norm_scalars_are_logged_under_norm_layer_name():
    from normlab.callbacks.ics import norm_scalars
    from normlab.models.backbones import CNN

    model = CNN((1, 8, 8), 10, norm=part("norm", "switchable"))
    scalars = norm_scalars(model.norm_layers())
    assert set(scalars) == {f"norm/layer{i}/{s}_{k}" for i in (1, 2) for s in ("mean", "var")
                            for k in ("in", "ln", "bn")}
    assert scalars["norm/layer1/mean_bn"] == pytest.approx(1 / 3)
    assert norm_scalars(CNN((1, 8, 8), 10, norm=part("norm", "bn")).norm_layers()) == {}


@pytest.mark.parametrize(("pair", "norm", "weights"), [("gn_ws", "GroupNorm", "standardized"),
                                                       ("in", "InstanceNorm", "plain")])
def test_groupnorm_batch_size_scales_lr_linearly_and_pairs_norm_and_weights(
    tmp_path, pair, norm, weights
):
    from normlab.config.resolvers import register_resolvers

    register_resolvers()  # as importing normlab.train does
    cfg = compose_cfg(tmp_path, "experiment=groupnorm_batch_size", "data.batch_size=2",
                      f"norm_and_weights={pair}")
    assert cfg.lr == pytest.approx(0.01 * 2 / 32) and cfg.optimizer.momentum == 0.9
    assert cfg.norm._target_.endswith(norm) and cfg.weights._target_.endswith(weights)
    validate(cfg)


def test_groupnorm_batch_size_figure_and_table(tmp_path):
    import json
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import groupnorm_batch_size as script

    for i, (norm, weights, batch, acc) in enumerate([
        ("bn", "plain", 2, 0.5), ("bn", "plain", 2, 0.7), ("bn", "plain", 32, 0.9),
        ("gn", "standardized", 2, 0.8), ("gn", "standardized", 32, 0.85),
    ]):
        job = tmp_path / "sweep" / str(i)
        job.mkdir(parents=True)
        (job / "metrics.json").write_text(json.dumps({
            "status": "ok", "val/acc": acc, "test/acc": acc,
            "hparams": {"norm": norm, "weights": weights, "batch_size": batch}}))
    cells, problems = script.collect([tmp_path / "sweep"])
    assert not problems and set(cells) == {"bn", "gn+standardized"}
    assert script.mean_std(cells["bn"][2]["val"]) == pytest.approx((40.0, 14.142), abs=1e-3)
    assert "| bn (val error %) | 40.0 ± 14.1 (n=2) | 10.0 ± 0.0 (n=1) |" in script.table(cells)
    written = script.draw(cells, tmp_path / "fig.png")
    assert written[0].stat().st_size > 1000
