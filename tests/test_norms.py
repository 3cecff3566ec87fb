"""Every norm choice against a reference: torch's module, or a slow loop / formula written here
for the variants torch lacks (Batch Renorm, Ghost BN, noisy BN). Train and eval mode, forward
and backward, float32 at 1e-5; and every norm x position x backbone trains a step."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import choices, compose_cfg, part
from torch import nn

import normlab.nn as ours
from normlab.models.backbones import CNN, MLP

TOL = {"rtol": 1e-5, "atol": 1e-5}
ROOT = Path(__file__).resolve().parents[1]


def data(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(shape[1], generator=g).view([-1] + [1] * (len(shape) - 2)) * 2
    return torch.randn(shape, generator=g) * 1.5 + offset, torch.randn(shape, generator=g)


def randomize_affine(*modules):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in modules:
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))


def outputs_and_grads(fn, module, x, grad_out):
    """fn(x) and the gradients of x and of the module's parameters."""
    x = x.clone().requires_grad_()
    y = fn(x)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(y, [x, *params], grad_out)
    return y.detach(), grads


def assert_same_step(mine, theirs, x, grad_out, mine_fn=None, theirs_fn=None):
    y1, g1 = outputs_and_grads(mine_fn or mine, mine, x, grad_out)
    y2, g2 = outputs_and_grads(theirs_fn or theirs, theirs, x, grad_out)
    torch.testing.assert_close(y1, y2, **TOL)
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b.reshape(a.shape), **TOL)


# ---- batch-independent norms: torch's modules ---------------------------------------------


@pytest.mark.parametrize("affine", [True, False])
def test_ln_mlp_is_torch_layernorm(affine):
    mine = part("norm", "ln", affine=affine)(12)
    theirs = nn.LayerNorm(12, elementwise_affine=affine)
    randomize_affine(mine, theirs)
    randomize_affine(theirs)
    mine.load_state_dict(theirs.state_dict())
    for training in (True, False):
        mine.train(training), theirs.train(training)
        assert_same_step(mine, theirs, *data((16, 12)))


def test_ln_cnn_has_layernorm_statistics_over_c_h_w_with_per_channel_affine():
    mine = part("norm", "ln")(6)
    randomize_affine(mine)
    reference = nn.LayerNorm([6, 5, 5], elementwise_affine=False)

    def theirs(x):
        return reference(x) * mine.weight.view(-1, 1, 1) + mine.bias.view(-1, 1, 1)

    assert_same_step(mine, mine, *data((4, 6, 5, 5)), theirs_fn=theirs)


@pytest.mark.parametrize(("channels", "spatial"), [(32, ()), (16, (3, 3))])
def test_gn_is_a_per_sample_loop_over_groups(channels, spatial):
    mine = part("norm", "gn", groups=8)(channels)
    randomize_affine(mine)
    assert isinstance(mine, nn.GroupNorm) and mine.num_groups == 8

    def theirs(x):
        rows = []
        for sample in x:  # slow reference: one sample, one group at a time
            groups = sample.reshape(8, -1)
            mean = groups.mean(1, keepdim=True)
            var = groups.var(1, unbiased=False, keepdim=True)
            rows.append(((groups - mean) / torch.sqrt(var + 1e-5)).reshape(sample.shape))
        shape = [-1] + [1] * len(spatial)
        return torch.stack(rows) * mine.weight.view(shape) + mine.bias.view(shape)

    assert_same_step(mine, mine, *data((5, channels, *spatial)), theirs_fn=theirs)


def test_gn_groups_clamp_and_refuse():
    assert part("norm", "gn", groups=8)(4).num_groups == 4  # clamped
    with pytest.raises(
        ValueError,
        match=r"norm.groups=7 does not divide 32 channels; valid: "
        r"1, 2, 4, 8, 16, 32",
    ):
        part("norm", "gn", groups=7)(32)


def test_rms_mlp_is_torch_rmsnorm():
    mine = part("norm", "rms")(12)
    reference = nn.RMSNorm(12)
    randomize_affine(reference)
    mine.load_state_dict(reference.state_dict())
    assert_same_step(mine, reference, *data((8, 12)))
    randomize_affine(mine)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 12, generator=g) + 1

    def theirs(x):  # the definition
        return (
            x
            / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)
            * (mine.weight)
        )

    assert_same_step(mine, mine, x, torch.randn(8, 12, generator=g), theirs_fn=theirs)


def test_rms_cnn_is_torch_rmsnorm_over_c_h_w_with_per_channel_gain():
    mine = part("norm", "rms", eps=1e-6)(6)
    randomize_affine(mine)
    theirs = nn.RMSNorm([6, 4, 4], eps=1e-6)
    with torch.no_grad():
        theirs.weight.copy_(mine.weight.view(-1, 1, 1).expand(6, 4, 4))
    x, grad_out = data((3, 6, 4, 4))
    y1, (gx1, gw1) = outputs_and_grads(mine, mine, x, grad_out)
    y2, (gx2, gw2) = outputs_and_grads(theirs, theirs, x, grad_out)
    torch.testing.assert_close(y1, y2, **TOL)
    torch.testing.assert_close(gx1, gx2, **TOL)
    torch.testing.assert_close(gw1, gw2.sum((1, 2)), **TOL)  # per-channel gain: summed grads


# ---- Batch Renorm --------------------------------------------------------------------------


def renorm_reference(x, bn_ref, r_max, d_max, weight, bias):
    """Ioffe 2017 Alg. 1 in plain autograd ops, r and d stopped; updates bn_ref's buffers."""
    dims = [0, *range(2, x.dim())]
    shape = [-1] + [1] * (x.dim() - 2)
    mean = x.mean(dims)
    var = x.var(dims, unbiased=False)
    batch_sigma = torch.sqrt(var + bn_ref.eps)
    sigma = torch.sqrt(bn_ref.running_var + bn_ref.eps)
    r = (batch_sigma / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mean - bn_ref.running_mean) / sigma).clamp(-d_max, d_max).detach()
    x_hat = (x - mean.view(shape)) / batch_sigma.view(shape) * r.view(shape) + d.view(shape)
    with torch.no_grad():  # running statistics exactly as BN moves them
        n = x.numel() // x.shape[1]
        bn_ref.running_mean.lerp_(mean, bn_ref.momentum)
        bn_ref.running_var.lerp_(var * n / (n - 1), bn_ref.momentum)
    return x_hat * weight.view(shape) + bias.view(shape)


@pytest.mark.parametrize("shape", [(16, 6), (4, 3, 5, 5)])
def test_batch_renorm_matches_the_paper_formula_train_and_eval(shape):
    cls = ours.BatchRenorm1d if len(shape) == 2 else ours.BatchRenorm2d
    mine = cls(shape[1], r_max=1.5, d_max=0.5, relax_start=0, r_max_full_at=0, d_max_full_at=0)
    randomize_affine(mine)
    ref_buffers = nn.BatchNorm1d(shape[1])  # holds the reference's running statistics
    clipped = 0
    for step in range(4):
        x, grad_out = data(shape, seed=step)
        x = x * (1 + step)  # batches drift: r and d hit their clips
        stats = (ref_buffers.running_mean.clone(), ref_buffers.running_var.clone())

        def theirs(x):
            return renorm_reference(x, ref_buffers, 1.5, 0.5, mine.weight, mine.bias)

        assert_same_step(mine, mine, x, grad_out, theirs_fn=theirs)
        torch.testing.assert_close(mine.running_mean, ref_buffers.running_mean, **TOL)
        torch.testing.assert_close(mine.running_var, ref_buffers.running_var, **TOL)
        sigma = torch.sqrt(stats[1] + 1e-5)
        clipped += int(((x.std() / sigma) > 1.5).any())
    assert clipped > 0
    mine.eval()
    bn = nn.BatchNorm2d(shape[1]) if len(shape) == 4 else nn.BatchNorm1d(shape[1])
    bn.load_state_dict(mine.state_dict(), strict=False)
    bn.eval()
    assert_same_step(mine, bn, *data(shape, seed=9))


def test_batch_renorm_with_r_max_1_d_max_0_is_bn():
    mine = ours.BatchRenorm1d(6, r_max=1.0, d_max=0.0, relax_start=0, r_max_full_at=0)
    bn = nn.BatchNorm1d(6)
    randomize_affine(mine)
    bn.load_state_dict(mine.state_dict(), strict=False)
    for step in range(3):
        assert_same_step(mine, bn, *data((16, 6), seed=step))
    torch.testing.assert_close(mine.running_mean, bn.running_mean)


def test_batch_renorm_schedule_is_the_papers():
    layer = ours.BatchRenorm1d(3)
    assert layer.limits_at(1) == (1.0, 0.0) and layer.limits_at(5000) == (1.0, 0.0)
    assert layer.limits_at(25000) == pytest.approx((1 + 2 * 20000 / 35000, 5.0))
    assert layer.limits_at(40000) == (3.0, 5.0) and layer.limits_at(10**6) == (3.0, 5.0)


# ---- Ghost BN ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 6), (8, 3, 4, 4)])
def test_ghost_bn_is_bn_per_ghost_batch(shape):
    cls = ours.GhostBatchNorm1d if len(shape) == 2 else ours.GhostBatchNorm2d
    torch_cls = nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d
    ghost = shape[0] // 4
    mine, bn = cls(shape[1], ghost_batch_size=ghost), torch_cls(shape[1])
    randomize_affine(mine)
    bn.load_state_dict(mine.state_dict())

    def theirs(x):  # the slow reference: torch's BN called on each ghost batch in turn
        return torch.cat([bn(x[i : i + ghost]) for i in range(0, len(x), ghost)])

    for step in range(2):
        assert_same_step(mine, bn, *data(shape, seed=step), theirs_fn=theirs)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(mine, name), getattr(bn, name))
    mine.eval(), bn.eval()
    assert_same_step(mine, bn, *data((5, *shape[1:])))  # eval: any batch size


def test_ghost_bn_with_one_ghost_batch_is_bn():
    mine, bn = ours.GhostBatchNorm1d(6, ghost_batch_size=16), nn.BatchNorm1d(6)
    assert_same_step(mine, bn, *data((16, 6)))


def test_ghost_bn_refuses_a_batch_that_is_not_a_multiple():
    with pytest.raises(
        ValueError, match="ghost_batch_size=16 does not divide the training batch of 24"
    ):
        ours.GhostBatchNorm1d(6, ghost_batch_size=16)(torch.randn(24, 6))


# ---- noisy BN ------------------------------------------------------------------------------


def test_noisy_bn_in_eval_is_bn():
    mine, bn = ours.NoisyBatchNorm2d(3), nn.BatchNorm2d(3)
    randomize_affine(mine)
    mine(torch.randn(8, 3, 4, 4) * 3 + 1)  # some running statistics
    bn.load_state_dict(mine.state_dict())
    mine.eval(), bn.eval()
    assert_same_step(mine, bn, *data((4, 3, 4, 4)))


def test_noisy_bn_in_training_is_bn_then_the_drawn_noise():
    mine, bn = ours.NoisyBatchNorm2d(3), nn.BatchNorm2d(3)
    randomize_affine(mine)
    bn.load_state_dict(mine.state_dict())
    x, grad_out = data((4, 3, 5, 5))

    def theirs(x):
        torch.manual_seed(5)
        y = bn(x)
        shift, scale = mine.sample_noise(y)
        return y * scale + shift

    def noisy(x):
        torch.manual_seed(5)
        return mine(x)

    assert_same_step(mine, bn, x, grad_out, mine_fn=noisy, theirs_fn=theirs)


def test_noisy_bn_noise_has_the_configured_statistics():
    layer = ours.NoisyBatchNorm1d(4, n_mu=0.5, n_sigma=1.25, r_mu=0.1, r_sigma=0.2)
    torch.manual_seed(0)
    draws = 4000
    shifts, scales = zip(
        *(layer.sample_noise(torch.empty(64, 4)) for _ in range(draws)), strict=True
    )
    shift, scale = torch.stack(shifts), torch.stack(scales)  # (draws, samples, units)
    unit_shift, unit_scale = shift.mean(1), scale.mean(1)  # per step and unit: ~ mu_j, sigma_j
    # per-unit means: U(-n_mu, n_mu) and U(1, n_sigma), plus the spread of a mean of 64 draws
    assert unit_shift.mean().item() == pytest.approx(0.0, abs=0.01)
    assert unit_shift.std().item() == pytest.approx((0.5**2 / 3 + 0.1**2 / 64) ** 0.5, rel=0.03)
    assert unit_shift.min() > -0.56 and unit_shift.max() < 0.56  # 0.5 + 4 sd of a 64-mean
    assert unit_scale.mean().item() == pytest.approx(1.125, abs=0.01)
    assert unit_scale.std().item() == pytest.approx((0.25**2 / 12 + 0.2**2 / 64) ** 0.5, rel=0.03)
    # per sample around them: standard deviations r_mu and r_sigma
    assert (shift - unit_shift[:, None]).std().item() == pytest.approx(0.1, rel=0.02)
    assert (scale - unit_scale[:, None]).std().item() == pytest.approx(0.2, rel=0.02)


def test_noisy_bn_conv_noise_varies_over_spatial_positions_but_not_its_unit_mean():
    layer = ours.NoisyBatchNorm2d(2, r_mu=0.1, r_sigma=0.1)
    torch.manual_seed(0)
    shift, _ = layer.sample_noise(torch.empty(8, 2, 16, 16))
    assert shift.std((0, 2, 3)).min() > 0.08  # per position, not per channel only
    per_channel = shift.mean((0, 2, 3))
    assert (per_channel.abs() < 0.5 + 0.01).all()


# ---- every norm on every backbone, both positions ------------------------------------------


@pytest.mark.parametrize("position", ["pre", "post"])
@pytest.mark.parametrize("backbone", [MLP, CNN])
@pytest.mark.parametrize("norm", choices("norm"))
def test_every_norm_position_and_backbone_trains_a_step(norm, backbone, position):
    torch.manual_seed(0)
    model = backbone((1, 8, 8), 10, norm=part("norm", norm), norm_position=position)
    if backbone is MLP and refuses_features(norm):  # image-only (in): one line, on the MLP
        with pytest.raises(ValueError, match=r"^[^\n]*use model=cnn"):
            model(torch.randn(4, 1, 8, 8))
        return
    block = model.blocks.layer1
    names = [name for name, _ in block.named_children()]
    assert (
        names.index("norm") < names.index("act")
        if position == "pre"
        else (names.index("norm") > names.index("act"))
    )
    assert list(model.norm_layers()) == ([] if norm == "none" else ["layer1", "layer2"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    weights = [layer.weight for layer in model.weight_layers().values()]
    before = [w.detach().clone() for w in weights]
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    # (a bias right before a BN gets no gradient: BN subtracts it again)
    assert all(not torch.equal(a, b) for a, b in zip(before, weights, strict=True))
    model.eval()
    assert model(x[:1]).shape == (1, 10)


def test_same_seed_same_weights_for_every_norm_and_position():
    def weights(norm, position):
        torch.manual_seed(3)
        model = CNN((1, 8, 8), 10, norm=part("norm", norm), norm_position=position)
        return [layer.weight.detach() for layer in model.weight_layers().values()]

    reference = weights("none", "pre")
    for norm in choices("norm"):
        for position in ("pre", "post"):
            assert all(
                torch.equal(a, b) for a, b in zip(reference, weights(norm, position), strict=True)
            )


# ---- the real command line ----------------------------------------------------------------

ALL = "none,bn,custom_bn,ln,gn,rms,batch_renorm,ghost_bn,noisy_bn"


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["model=cnn"], ["norm.position=post"]])
def test_cli_sweep_over_every_norm_ends_ok(tmp_path, extra):
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            f"norm={ALL}",
            "trainer.max_epochs=2",
            f"hydra.sweep.dir={tmp_path}",
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    statuses = [p.read_text() for p in sorted(tmp_path.glob("*/metrics.json"))]
    assert len(statuses) == 9 and all('"status": "ok"' in s for s in statuses)


# ---- validation: one line per bad norm option ------------------------------------------------

BAD_NORM_OPTIONS = [
    (
        ["norm=gn", "norm.groups=7"],
        "norm.groups=7 does not divide 32 channels; valid: 1, 2, 4, 8, 16, 32",
    ),
    (
        ["norm=ghost_bn", "norm.ghost_batch_size=12"],
        "norm.ghost_batch_size=12 does not divide "
        "the training batch of 32 samples (per process); valid: 2, 4, 8, 16, 32",
    ),
    (
        ["norm=noisy_bn", "data.batch_size=1"],
        "data.batch_size=1: NoisyBatchNorm normalizes with the statistics of the batch and needs "
        "at least 2 samples per batch (per process) in training; use a larger data.batch_size "
        "or a batch-independent norm (evonorm_s0, frn, gn, in, ln, none, rms)",
    ),
    (["norm.position=middle"], "norm.position='middle' is not valid; choose one of: pre, post"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_NORM_OPTIONS)
def test_bad_norm_options_are_one_clear_line(overrides, message):
    from normlab.config.validate import ConfigError, validate

    cfg = compose_train(overrides)
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "norm", [n for n in choices("norm") if not ours.batch_dependent(part("norm", n)(4))]
)
def test_batch_independent_norms_accept_batch_1(norm):
    from normlab.config.validate import validate

    model = ["model=cnn"] if refuses_features(norm) else []
    validate(compose_train([f"norm={norm}", "data.batch_size=1", *model]))


def refuses_features(norm: str) -> bool:
    """An image-only norm (Instance Norm) refuses (N, C) features with a ValueError."""
    try:
        part("norm", norm)(4).train()(torch.randn(32, 4))
    except ValueError:
        return True
    return False


def compose_train(overrides):
    return compose_cfg(Path("/tmp"), *overrides)
