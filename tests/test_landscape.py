"""Loss-landscape probe: exact values on losses with known curvature, and no trace on training."""

from __future__ import annotations

import copy
import json
import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import assert_identical, compose_cfg, part
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import open_dict
from torch import nn

from normlab.callbacks.landscape import LossLandscape, landscape, probe_module, step_sizes
from normlab.models.vgg import VGG
from normlab.results.runs import read_scalars
from normlab.train import build_module, train

ETAS = step_sizes(0.1, 8)


def test_step_sizes_span_half_to_four_times_the_lr_geometrically():
    assert len(ETAS) == 8
    assert ETAS[0] == pytest.approx(0.05) and ETAS[-1] == pytest.approx(0.4)
    ratios = [b / a for a, b in zip(ETAS, ETAS[1:], strict=False)]
    assert ratios == pytest.approx([8 ** (1 / 7)] * 7)
    assert step_sizes(0.2, 1) == [pytest.approx(0.1)]


def quadratic(hessian: torch.Tensor):
    return lambda p: 0.5 * p["w"] @ hessian @ p["w"]


def test_quadratic_beta_smoothness_is_the_curvature_along_the_gradient():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    eigenvalues = torch.tensor([0.5, 1.0, 2.0, 3.0, 7.0], dtype=torch.float64)
    hessian = q @ torch.diag(eigenvalues) @ q.T
    w = torch.randn(5, dtype=torch.float64)
    g = hessian @ w  # the gradient at w
    numbers = landscape(quadratic(hessian), {"w": w}, {"w": g}, ETAS)
    # grad L(w) - grad L(w - eta g) = eta H g, so the ratio to ||eta g|| is ||H g|| / ||g||
    expected = float((hessian @ g).norm() / g.norm())
    assert numbers["beta_smooth"] == pytest.approx(expected, rel=1e-12)
    assert numbers["grad_pred_max"] == pytest.approx(ETAS[-1] * float((hessian @ g).norm()))
    losses = [float(0.5 * (w - e * g) @ hessian @ (w - e * g)) for e in ETAS]
    assert numbers["loss_min"] == pytest.approx(min(losses), rel=1e-12)
    assert numbers["loss_max"] == pytest.approx(max(losses), rel=1e-12)
    # along an eigenvector the effective smoothness is exactly its eigenvalue
    along_top = landscape(quadratic(hessian), {"w": w}, {"w": q[:, 4]}, ETAS)
    assert along_top["beta_smooth"] == pytest.approx(7.0, rel=1e-12)


def test_gradient_predictiveness_is_zero_for_a_linear_loss():
    a = {"w": torch.randn(4, 3, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    params = {name: torch.randn_like(v) for name, v in a.items()}
    linear = lambda p: sum((a[n] * p[n]).sum() for n in a) + 1.5  # noqa: E731
    numbers = landscape(linear, params, a, ETAS)
    assert numbers["grad_pred_max"] == 0.0 and numbers["beta_smooth"] == 0.0
    slope = sum(float((v * v).sum()) for v in a.values())  # L(x - eta a) = L(x) - eta ||a||^2
    here = float(linear(params))
    assert numbers["loss_max"] == pytest.approx(here - ETAS[0] * slope, rel=1e-12)
    assert numbers["loss_min"] == pytest.approx(here - ETAS[-1] * slope, rel=1e-12)


def snapshot(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {
        "state": copy.deepcopy(module.state_dict()),
        "grads": [p.grad.clone() for p in module.parameters()],
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "rng": torch.get_rng_state(),
    }


def test_probe_writes_nothing_it_was_given():
    torch.manual_seed(0)
    model = VGG((1, 8, 8), 10, norm=part("norm", "bn"), dropout=0.3).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(2):  # momentum buffers and moved running statistics to protect
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    before = snapshot(model, optimizer)
    numbers = probe_module(model, optimizer, x, y)
    assert_identical(before, snapshot(model, optimizer))
    assert all(math.isfinite(v) for v in numbers.values())
    assert 0 < numbers["loss_min"] <= numbers["loss_max"] and numbers["grad_pred_max"] > 0


class SpyLandscape(LossLandscape):
    """Remembers the mini-batch of every measurement."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.inputs: dict[int, torch.Tensor] = {}

    def current_minibatch(self, trainer, pl_module):
        x, y = super().current_minibatch(trainer, pl_module)
        self.inputs[trainer.global_step] = x.clone()
        return x, y


def fit(root, callbacks, steps_per_batch: int = 3):
    """Two epochs of VGG with BN and dropout on digits, K optimizer steps per Lightning batch."""
    cfg = compose_cfg(root, "model=vgg", "norm=bn", "dropout=0.2", "lr=0.01", "~logger")
    with open_dict(cfg):  # the key's name before and after the rename to steps_per_batch
        cfg.data["steps_per_batch" if "steps_per_batch" in cfg.data else "steps_per_call"] = (
            steps_per_batch
        )
    pl.seed_everything(0, verbose=False)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, logger=TensorBoardLogger(root, name="tb", version=""),
        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=datamodule)
    return module, datamodule, trainer


def stacked_inputs(batch) -> torch.Tensor:
    """x of a training batch: a (K, B, ...) tensor, in a tuple or a MiniBatchStack."""
    return batch.x if hasattr(batch, "x") else batch[0]


def test_training_is_bit_identical_with_and_without_the_probe(tmp_path):
    spy = SpyLandscape(every_n_steps=4, num_points=3)
    probed, datamodule, trainer = fit(tmp_path / "with", [spy])
    probed_rng = torch.get_rng_state()
    plain, _, _ = fit(tmp_path / "without", [])
    assert_identical(probed.state_dict(), plain.state_dict())  # weights and BN running stats
    optimizers = [m.optimizers().optimizer.state_dict() for m in (probed, plain)]
    assert_identical(*optimizers)
    assert torch.equal(probed_rng, torch.get_rng_state())

    steps = 2 * (1197 // 32)
    assert sorted(spy.inputs) == list(range(0, steps, 4))
    # each measurement used its own optimizer step's mini-batch (3 per Lightning batch)
    minibatches = []
    for epoch in range(2):
        loader = datamodule.train_dataloader()
        loader.set_epoch(epoch)
        minibatches.extend(x for batch in loader for x in stacked_inputs(batch))
    for step, x in spy.inputs.items():
        assert torch.equal(x, minibatches[step]), step

    logged = read_scalars(tmp_path / "with", prefix="landscape/")
    assert set(logged) == {f"landscape/{k}" for k in spy_measures()}
    assert sorted(logged["landscape/grad_pred_max"]) == sorted(spy.inputs)
    summary = spy.ics_summary()["landscape"]
    assert summary["grad_pred_max_mean"] == pytest.approx(
        sum(logged["landscape/grad_pred_max"].values()) / len(spy.inputs)
    )
    assert summary["measurements"] == len(spy.inputs)


def spy_measures() -> tuple[str, ...]:
    return ("loss_min", "loss_max", "grad_pred_max", "beta_smooth")


def test_bad_options_are_one_clear_line():
    with pytest.raises(ValueError, match=r"num_points=0 must be >= 1"):
        LossLandscape(num_points=0)
    with pytest.raises(ValueError, match=r"eta_range=\[4.0, 0.5\]"):
        LossLandscape(eta_range=(4.0, 0.5))


def test_callbacks_landscape_reaches_metrics_json(make_cfg, tmp_path):
    cfg = make_cfg(
        "model=vgg", "callbacks=landscape", "callbacks.landscape.every_n_steps=10",
        "trainer.max_epochs=1", "~logger",
    )
    result = train(cfg)
    written = json.loads((tmp_path / "metrics.json").read_text())
    numbers = written["ics"]["landscape"]
    assert numbers == pytest.approx(result["ics"]["landscape"])
    assert numbers["measurements"] == 4  # steps 0, 10, 20, 30 of 37
    assert numbers["loss_band_mean"] == pytest.approx(
        numbers["loss_max_mean"] - numbers["loss_min_mean"]
    )
