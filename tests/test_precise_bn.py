"""PreciseBN: population BN statistics as a plain average over training batches."""

import csv

import pytest
import torch
from conftest import compose_cfg, part
from torch import nn
from torch.optim.swa_utils import update_bn

import normlab.nn as ours
from normlab.callbacks.precise_bn import batch_norms, recompute_bn_statistics
from normlab.models.backbones import CNN, MLP
from normlab.train import train


def batches(shape, count=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (1 + i) + i for i in range(count)]


def trained_a_little(model, shape):
    with torch.no_grad():
        for x in batches(shape, 3, seed=1):  # EMA statistics that differ from the population's
            model(x)
    return model


@pytest.mark.parametrize("norm", ["bn", "custom_bn", "batch_renorm"])
@pytest.mark.parametrize("cls", [MLP, CNN])
def test_equals_swa_update_bn_on_the_same_batches(cls, norm):
    """update_bn knows torch's BN only: the reference is a torch-BN twin with the same state
    (our BN computes torch's; batch renorm before its warm-up ends is BN)."""
    torch.manual_seed(0)
    model = trained_a_little(cls((1, 8, 8), 10, norm=part("norm", norm)), (32, 1, 8, 8))
    reference = cls((1, 8, 8), 10, norm=part("norm", "bn"))
    reference.load_state_dict(model.state_dict())
    data = batches((32, 1, 8, 8))
    update_bn(data, reference)
    assert recompute_bn_statistics(model, data) == len(data)
    assert len(batch_norms(model)) == 2
    for mine, theirs in zip(batch_norms(model), batch_norms(reference), strict=True):
        torch.testing.assert_close(mine.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.running_var, theirs.running_var, rtol=1e-5, atol=1e-5)


def test_ghost_bn_population_is_the_average_over_ghost_batches():
    layer = ours.GhostBatchNorm1d(3, ghost_batch_size=8)
    data = batches((16, 3))
    recompute_bn_statistics(layer, data)
    ghosts = [g for x in data for g in x.split(8)]
    expected_mean = torch.stack([g.mean(0) for g in ghosts]).mean(0)
    expected_var = torch.stack([g.var(0) for g in ghosts]).mean(0)
    torch.testing.assert_close(layer.running_mean, expected_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.running_var, expected_var, rtol=1e-6, atol=1e-6)


def test_equals_a_hand_computed_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), ours.BatchNorm1d(3, momentum=0.3))
    model.eval()
    trained_a_little(model.train(), (16, 4)).eval()
    tracked_before = model[1].num_batches_tracked.clone()
    data = batches((16, 4))
    recompute_bn_statistics(model, data)
    with torch.no_grad():
        features = [model[0](x) for x in data]
    expected_mean = torch.stack([f.mean(0) for f in features]).mean(0)
    expected_var = torch.stack([f.var(0, unbiased=True) for f in features]).mean(0)
    torch.testing.assert_close(model[1].running_mean, expected_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, expected_var, rtol=1e-6, atol=1e-6)
    # momentum, the step counter (Batch Renorm's schedule) and eval mode are kept
    assert model[1].momentum == 0.3 and torch.equal(model[1].num_batches_tracked, tracked_before)
    assert not model.training


def read_csv_metrics(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows if r.get(k)] for k in rows[0]}


@pytest.mark.slow
def test_callback_logs_both_evaluations_and_leaves_training_unchanged(tmp_path):
    common = ["trainer.max_epochs=2", "logger=csv", "norm=custom_bn", "dropout=0.2"]
    with_cb = train(compose_cfg(tmp_path / "a", *common, "callbacks=precise_bn"))
    without = train(compose_cfg(tmp_path / "b", *common))
    assert with_cb["status"] == without["status"] == "ok"
    logged = read_csv_metrics(tmp_path / "a" / "csv" / "metrics.csv")
    baseline = read_csv_metrics(tmp_path / "b" / "csv" / "metrics.csv")
    assert len(logged["val/acc_ema"]) == 2 and len(logged["test/acc_ema"]) == 1
    # the EMA evaluation of the callback run is the plain run's evaluation ...
    assert logged["val/acc_ema"] == pytest.approx(baseline["val/acc"], abs=1e-6)
    assert logged["test/acc_ema"] == pytest.approx(baseline["test/acc"], abs=1e-6)
    # ... and training is untouched: same weights and EMA buffers at the end
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)
