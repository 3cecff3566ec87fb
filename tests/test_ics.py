"""ICS callbacks: what they log equals what they measured, when they log it, and that they leave
training untouched."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ROOT,
    assert_identical,
    compose_cfg,
    get_json,
    part,
    tensorboard_server,
    wait_for_json,
)
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import OmegaConf
from torch import nn
from torch.func import functional_call
from torch.utils.tensorboard.summary import histogram

from normlab.callbacks.ics import (
    GradShift,
    ICSMonitor,
    StepCadence,
    WeightStats,
    histogram_values,
)
from normlab.callbacks.measure import (
    ActivationProbe,
    distribution_stats,
    grad_shift,
    probe_activations,
)
from normlab.callbacks.summary import activation_summary
from normlab.data.datamodule import NormLabDataModule
from normlab.models.backbones import MLP
from normlab.models.module import ClassifierModule
from normlab.results.runs import read_scalars

EVERY = 5
STEPS_PER_BATCH = 3
STEPS = 1197 // 32  # digits: 1,197 training samples, batch 32, one epoch


class SpyActivations(ICSMonitor):
    """Keeps a copy of every captured tensor, to recompute what should have been logged."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: dict[int, dict[str, torch.Tensor]] = {}

    def log_activations(self, trainer, step, activations, *args, **kwargs) -> None:
        self.seen[step] = {k: v.clone() for k, v in activations.items()}
        super().log_activations(trainer, step, activations, *args, **kwargs)


def fit(
    root: Path, callbacks: list[pl.Callback], *, steps_per_batch: int = 1, dropout: float = 0.0,
    csv: bool = False, max_steps: int = -1,
) -> tuple[pl.Trainer, ClassifierModule]:
    pl.seed_everything(0, verbose=False)
    datamodule = NormLabDataModule("digits", root=root / "data", batch_size=32,
                                   steps_per_batch=steps_per_batch)
    backbone = MLP(datamodule.input_shape, datamodule.num_classes, hidden_sizes=(16, 16),
                   norm=part("norm", "bn"), dropout=dropout)
    module = ClassifierModule(
        backbone, datamodule.num_classes, optimizer=partial(torch.optim.Adam, lr=0.01)
    )
    loggers = [TensorBoardLogger(root, name="tb", version="")]
    if csv:
        loggers.append(CSVLogger(root, name="csv", version=""))
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, max_steps=max_steps, logger=loggers, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer, module


def final_state(root: Path, callbacks: list[pl.Callback], steps: int) -> dict:
    """Model and optimizer state after `steps` steps with dropout and 2 steps per batch (a
    probe that touched the RNG, the batch order or a buffer would change them)."""
    trainer, module = fit(root, callbacks, steps_per_batch=2, dropout=0.2, max_steps=steps)
    assert trainer.global_step == steps
    return copy.deepcopy({"model": module.state_dict(),
                          "optimizer": trainer.optimizers[0].state_dict()})


@pytest.fixture(scope="module")
def icsrun(tmp_path_factory):
    """One epoch on digits, 3 optimizer steps per Lightning batch, all ICS callbacks every 5."""
    root = tmp_path_factory.mktemp("icsrun")
    spy = SpyActivations(every_n_steps=EVERY, probe_size=64, output_dir=root)
    shift = GradShift(every_n_steps=EVERY, output_dir=root)
    callbacks = [spy, shift]
    trainer, module = fit(root, callbacks, steps_per_batch=STEPS_PER_BATCH, csv=True)
    return {"root": root, "spy": spy, "shift": shift, "trainer": trainer, "module": module,
            "scalars": read_scalars(root / "tb")}


def test_logged_percentiles_mean_std_equal_the_captured_tensor(icsrun):
    scalars, seen = icsrun["scalars"], icsrun["spy"].seen
    assert seen and set(seen[0]) == {"layer1", "layer2"}
    for step, activations in seen.items():
        for layer, x in activations.items():
            values = x.double().numpy().ravel()
            expected = dict(zip(("p15", "p50", "p85"), np.percentile(values, [15, 50, 85]),
                                strict=True))
            expected.update(mean=values.mean(), std=values.std(ddof=1))
            for name, value in expected.items():
                logged = scalars[f"ics/{layer}/{name}"][step]
                assert logged == pytest.approx(value, rel=1e-5, abs=1e-6), (step, layer, name)


def test_probe_is_held_out_and_fixed(icsrun):
    datamodule = icsrun["trainer"].datamodule
    val_x = datamodule.load().val[0]
    assert torch.equal(icsrun["spy"].probe, val_x[:64])


def test_histograms_and_grad_norms_are_logged(icsrun):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(icsrun["root"] / "tb"), size_guidance={"histograms": 0})
    accumulator.Reload()
    histograms = set(accumulator.Tags()["histograms"])
    assert {"preact/layer1", "preact/layer2"} <= histograms
    assert {"weights/layer1", "weights/layer2", "weights/head"} <= histograms
    first = accumulator.Histograms("preact/layer1")[0]
    assert first.step == 0 and first.histogram_value.num == 64 * 16  # probe x units
    assert {"grads/layer1/norm", "grads/layer2/norm", "grads/head/norm"} <= set(icsrun["scalars"])


def test_scalars_reach_every_logger(icsrun):
    header = (icsrun["root"] / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"ics/layer2/p50", "ics/layer2/grad_shift", "grads/head/norm"} <= set(header)


def test_cadence_counts_optimizer_steps_not_batches(icsrun):
    scalars = icsrun["scalars"]
    assert icsrun["trainer"].global_step == STEPS
    exact = set(range(0, STEPS, EVERY)) | {STEPS}  # ...and the trained model at the end
    assert STEPS % EVERY  # (so the final point is an extra one)
    assert set(scalars["ics/layer1/p50"]) == exact
    assert set(scalars["grads/layer1/norm"]) == exact - {STEPS}  # no update follows the end
    # grad shift needs a whole batch: the start of each batch whose 3 steps contain a multiple of 5
    starts = range(0, STEPS, STEPS_PER_BATCH)
    due = {s for s in starts if any((s + k) % EVERY == 0
                                    for k in range(min(STEPS_PER_BATCH, STEPS - s)))}
    assert set(scalars["ics/layer2/grad_shift"]) == due


def test_step_cadence_rules():
    cadence = StepCadence(5)
    assert [s for s in range(12) if cadence.due(s)] == [0, 5, 10]
    assert cadence.due_within(3, 3) and not cadence.due_within(6, 3) and cadence.due_within(10, 1)
    with pytest.raises(ValueError):
        StepCadence(0)


def test_hooks_are_removed_after_training(icsrun):
    for module in icsrun["module"].modules():
        assert not module._forward_pre_hooks and not module._forward_hooks


def test_summary_and_its_read_back_from_event_files(icsrun):
    summary = icsrun["spy"].ics_summary()
    p50 = icsrun["scalars"]["ics/layer2/p50"]
    first, last = min(p50), max(p50)
    assert summary["layer2"]["p50_travel"] == pytest.approx(abs(p50[last] - p50[first]))
    assert icsrun["shift"].ics_summary()["layer2"]["grad_shift_mean"] > 0
    # a callback that never trained (the parent process under ddp_spawn) reads rank 0's files
    parent = ICSMonitor(output_dir=icsrun["root"]).ics_summary()
    assert parent.keys() == summary.keys() == {"layer1", "layer2"}
    for layer, numbers in summary.items():
        assert parent[layer] == pytest.approx(numbers)
    assert GradShift(output_dir=icsrun["root"]).ics_summary().keys() == {"layer1", "layer2", "head"}
    assert ICSMonitor().ics_summary() == {}


def test_summary_survives_a_checkpoint(icsrun):
    restored = ICSMonitor()
    restored.load_state_dict(copy.deepcopy(icsrun["spy"].state_dict()))
    assert restored.ics_summary() == icsrun["spy"].ics_summary()


def test_histograms_of_the_same_data_are_binned_once_and_read_as_tensorboard_writes_them():
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    broken = x.clone()
    broken[0, 0] = float("nan")
    values = histogram_values(
        {"preact/l": x, "norm_out/l": x.detach(), "other": x * 2, "half": x[:32],
         "broken": broken, "dead": torch.full((4,), float("inf"))}, bins=16)
    got = {v.tag: v.histo for v in values}
    assert list(got) == ["preact/l", "norm_out/l", "other", "half", "broken"]  # no finite value
    expected = {tag: histogram(tag, t, bins=16).value[0].histo  # what add_histogram writes
                for tag, t in {"preact/l": x, "other": x * 2, "half": x[:32]}.items()}
    assert got["preact/l"] == got["norm_out/l"] == expected["preact/l"]
    assert got["other"] == expected["other"] != expected["preact/l"]
    assert got["half"] == expected["half"] and got["half"].num == 32 * 8  # a view, not the same
    assert got["broken"].num == 64 * 8 - 1  # the NaN left out


def test_percentiles_are_sampled_above_the_quantile_limit():
    x = torch.arange(1000, dtype=torch.float32)
    stats = distribution_stats(x, limit=100)
    assert stats["p50"] == pytest.approx(float(np.percentile(np.arange(0, 1000, 10), 50)))
    assert stats["mean"] == pytest.approx(499.5)  # mean and std use every value


def tiny_model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(),
                         nn.Dropout(dropout) if dropout else nn.Identity(), nn.Linear(5, 3))


def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=generator), torch.randint(0, 3, (8,), generator=generator)


def test_grad_shift_equals_a_hand_computation_with_sgd():
    model, (x, y), lr = tiny_model(), tiny_batch(), 0.5  # BN in train mode: batch statistics
    params = dict(model.named_parameters())

    def loss_at(p):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    grads = dict(zip(params, torch.autograd.grad(loss_at(params), list(params.values())),
                     strict=True))
    # G' of the head: layer 0 (Linear) and layer 1 (BN affine) moved by one SGD step
    moved = {k: (v - lr * grads[k] if k.startswith(("0.", "1.")) else v) for k, v in params.items()}
    (after,) = torch.autograd.grad(loss_at(moved), [params["4.weight"]])
    expected = (grads["4.weight"] - after).norm().item()
    cos = F.cosine_similarity(grads["4.weight"].reshape(-1), after.reshape(-1), dim=0).item()

    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    shifts = grad_shift(model, optimizer, {"layer1": model[0].weight, "head": model[4].weight},
                        lambda: F.cross_entropy(model(x), y))
    assert shifts["layer1"] == (0.0, 1.0)  # nothing before the first layer moves
    assert shifts["head"][0] == pytest.approx(expected, rel=1e-5) and expected > 0
    assert shifts["head"][1] == pytest.approx(cos, rel=1e-6)


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return copy.deepcopy({
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "grads": [p.grad for p in model.parameters()],
        "rng": torch.get_rng_state(),
        "training": model.training,
    })


def test_grad_shift_with_adam_matches_a_copy_and_leaves_no_trace():
    model, (x, y) = tiny_model(dropout=0.3), tiny_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(2):  # some optimizer state and running statistics to preserve
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    before = snapshot(model, optimizer)
    shifts = grad_shift(model, optimizer, {"head": model[4].weight},
                        lambda: F.cross_entropy(model(x), y))
    assert_identical(snapshot(model, optimizer), before)

    # the same by hand on copies: one Adam step of the layers before the head, same dropout mask
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.01)
    twin_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    rng = torch.get_rng_state()
    loss = F.cross_entropy(twin(x), y)
    twin_opt.zero_grad(set_to_none=True)
    loss.backward()
    g = twin[4].weight.grad.clone()
    twin[4].weight.grad = twin[4].bias.grad = None
    twin_opt.step()
    torch.set_rng_state(rng)
    twin_opt.zero_grad(set_to_none=True)
    F.cross_entropy(twin(x), y).backward()
    assert shifts["head"][0] == pytest.approx((g - twin[4].weight.grad).norm().item(), rel=1e-5)


def test_training_is_bit_identical_with_and_without_the_ics_callbacks(tmp_path):
    plain = final_state(tmp_path / "plain", [], 20)
    measured = final_state(tmp_path / "measured", [
        GradShift(every_n_steps=1), ICSMonitor(every_n_steps=1),
        WeightStats(every_n_steps=1),
    ], 20)
    assert read_scalars(tmp_path / "measured", "ics/head/grad_shift")  # it did measure
    assert_identical(measured, plain)


def test_tensorboard_server_serves_the_ics_tags(icsrun):
    with tensorboard_server(icsrun["root"] / "tb") as data:
        base = f"{data}/plugin"
        histograms = wait_for_json(
            f"{base}/histograms/tags",
            lambda answer: any("preact/layer1" in tags for tags in answer.values()),
        )
        run_tags = next(iter(histograms.values()))
        assert {"preact/layer1", "preact/layer2", "weights/head"} <= set(run_tags)
        scalars = next(iter(get_json(f"{base}/scalars/tags").values()))
        assert {f"ics/layer2/{s}" for s in ("p15", "p50", "p85", "mean", "std", "grad_shift")} \
            <= set(scalars)
        layout = json.dumps(get_json(f"{base}/custom_scalars/layout"))
        assert "ics/layer2/p85" in layout and "MARGIN" in layout.upper()


def test_fig1_script_draws_a_png_from_a_short_sweep(tmp_path):
    from normlab.train import train

    sweep = tmp_path / "sweep"
    for job, norm in enumerate(["none", "bn"]):
        cfg = compose_cfg(sweep / str(job), "experiment=bn_paper_fig1", f"norm={norm}",
                          "trainer.max_epochs=1", "callbacks.ics.every_n_steps=4")
        (sweep / str(job) / ".hydra").mkdir(parents=True)
        OmegaConf.save(cfg, sweep / str(job) / ".hydra" / "config.yaml")  # as Hydra would
        metrics = train(cfg)
        assert {"layer1", "layer2", "layer3"} <= metrics["ics"].keys()
        scalars = read_scalars(sweep / str(job), "ics/")
        assert all(f"ics/{layer}/grad_shift" in scalars for layer in ("layer1", "layer2", "layer3"))
    out = tmp_path / "fig1.png"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "fig1.py"), str(sweep),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_activation_summary_numbers():
    series = {"ics/layer1/p15": {0: -1.0, 10: -3.0}, "ics/layer1/p50": {0: 0.0, 10: 0.5},
              "ics/layer1/p85": {0: 1.0, 10: 2.0}}
    assert activation_summary(series)["layer1"] == {
        "p50_start": 0.0, "p50_end": 0.5, "p50_travel": 0.5, "p50_max_shift": 0.5,
        "spread_start": 2.0, "spread_end": 5.0,
    }


def test_probe_normalizes_with_batch_statistics_and_changes_nothing():
    torch.manual_seed(0)
    backbone = MLP((20,), 3, hidden_sizes=(16, 8), norm=part("norm", "bn"), dropout=0.5)
    model = ClassifierModule(backbone, 3)
    model.train()
    x = torch.randn(256, 20) * 3 + 2
    buffers = copy.deepcopy(dict(model.named_buffers()))
    rng = torch.get_rng_state()
    preact, norm_out = probe_activations(model, x)  # step 0: running stats are still (0, 1)
    for layer in ("layer1", "layer2"):
        out = norm_out[layer]
        assert torch.allclose(out.mean(0), torch.zeros(out.shape[1]), atol=1e-3)
        assert torch.allclose(out.std(0, unbiased=False), torch.ones(out.shape[1]), atol=1e-3)
        assert torch.equal(preact[layer], out)  # pre position: the norm output enters the ReLU
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(m.training for m in model.modules())


def test_a_probe_built_once_measures_as_a_fresh_one_after_training_steps():
    torch.manual_seed(0)
    backbone = MLP((20,), 3, hidden_sizes=(16, 8), norm=part("norm", "bn"), dropout=0.5)
    backbone.train()
    x = torch.randn(256, 20) * 3 + 2
    probe = ActivationProbe(backbone, x)  # what the ICS callback keeps for a whole fit
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.5)
    for _ in range(3):
        buffers = copy.deepcopy(dict(backbone.named_buffers()))
        without_dropout = copy.deepcopy(backbone)
        for module in without_dropout.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0  # the probe measures with dropout off
        kept, fresh = probe(), probe_activations(without_dropout, x)
        for got, expected in zip(kept, fresh, strict=True):
            assert got.keys() == expected.keys() == {"layer1", "layer2"}
            assert all(torch.equal(got[k], expected[k]) for k in got)
        assert all(torch.equal(buffers[k], v) for k, v in backbone.named_buffers())
        assert all(m.training for m in backbone.modules())  # dropout back on, too
        F.cross_entropy(backbone(x), torch.zeros(256, dtype=torch.long)).backward()
        optimizer.step()  # new weights and running statistics: the kept probe sees them


def test_probe_eval_mode_uses_running_statistics():
    torch.manual_seed(0)
    model = ClassifierModule(MLP((20,), 3, hidden_sizes=(16,), norm=part("norm", "bn")), 3)
    x = torch.randn(256, 20) * 3 + 2
    _, norm_out = probe_activations(model, x, mode="eval")
    linear_out = model.backbone.blocks.layer1.linear(x)  # BN with (0, 1) running stats: identity
    assert torch.allclose(norm_out["layer1"], linear_out / (1 + 1e-5) ** 0.5, atol=1e-5)
    with pytest.raises(ValueError, match="probe_mode='train' is not valid; choose one of: batch"):
        probe_activations(model, x, mode="train")
