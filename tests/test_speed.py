"""What the sweep-speed work changed keeps every record: dense ICS percentiles with sparse
histograms, percentiles equal to torch's, every swept value checked before a sweep starts, no
live progress bar off a terminal, the digits parsed once, and the bench's hand-written sweep doing
the work it claims. (Timings live in scripts/bench.py, not here.)"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from conftest import ROOT, compose_cfg
from lightning.pytorch.callbacks import RichProgressBar
from test_ics import fit

from normlab.callbacks.ics import ICSMonitor
from normlab.callbacks.measure import PERCENTILES, distribution_stats
from normlab.config.preflight import _expanded
from normlab.data.registry import load_digits
from normlab.results.runs import read_scalars
from normlab.run import process

DEFAULT_STEPS = 1197 // 32 * 10  # the default run: digits, batch 32, 10 epochs


def test_default_run_has_at_least_30_ics_points_and_sparse_histograms(tmp_path):
    ics = compose_cfg(tmp_path).callbacks.ics
    every = ics.every_n_steps
    points = len(range(0, DEFAULT_STEPS, every)) + (DEFAULT_STEPS % every > 0)  # + the end
    assert points >= 30
    assert ics.histogram_every_n_steps % ics.every_n_steps == 0  # on the same steps
    assert DEFAULT_STEPS // ics.histogram_every_n_steps <= 2


def test_percentiles_every_n_histograms_every_m(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = ICSMonitor(every_n_steps=4, histogram_every_n_steps=16, probe_size=32)
    trainer, _ = fit(tmp_path, [monitor])
    steps = trainer.global_step  # 37: one epoch
    p50 = read_scalars(tmp_path / "tb")["ics/layer1/p50"]
    assert sorted(p50) == [*range(0, steps, 4), steps]
    grads = read_scalars(tmp_path / "tb")["grads/layer1/norm"]
    assert set(grads) <= set(p50) and len(grads) >= len(p50) - 1
    accumulator = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0})
    accumulator.Reload()
    for tag in ("preact/layer1", "norm_out/layer1", "weights/layer1"):
        assert [e.step for e in accumulator.Histograms(tag)] == [*range(0, steps, 16), steps]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1000, 8192])
def test_percentiles_equal_torch_quantile(n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    stats = distribution_stats(x)
    expected = torch.quantile(x, torch.tensor(list(PERCENTILES.values()))).tolist()
    for name, value in zip(PERCENTILES, expected, strict=True):
        assert stats[name] == pytest.approx(value, rel=1e-6, abs=1e-6)
    nan = distribution_stats(torch.tensor([1.0, math.nan, 2.0]))
    assert all(math.isnan(v) for v in nan.values())


def test_preflight_composes_every_swept_value_in_as_many_composes_as_the_longest_sweep():
    sets = list(_expanded(["norm=none,bn", "activation=relu,sigmoid", "seed=0,1,2", "lr=0.1"]))
    assert len(sets) == 3
    seen = {o for overrides in sets for o in overrides}
    assert seen == {"norm=none", "norm=bn", "activation=relu", "activation=sigmoid",
                    "seed=0", "seed=1", "seed=2", "lr=0.1"}
    assert all(len(overrides) == 4 for overrides in sets)


def test_no_progress_bar_off_a_terminal(monkeypatch):
    bar, other = RichProgressBar(), object()
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert process.without_progress_bar_off_tty([bar, other]) == (
        [other], {"enable_progress_bar": False})
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert process.without_progress_bar_off_tty([bar, other]) == ([bar, other], {})


def test_digits_parsed_once_yet_every_load_is_its_own():
    first, second = load_digits(ROOT, False), load_digits(ROOT, False)
    assert torch.equal(first.train[0], second.train[0])
    first.train[0].add_(1.0)
    assert not torch.equal(first.train[0], load_digits(ROOT, False).train[0])


def test_hand_written_sweep_does_the_default_jobs_work():
    sys.path.insert(0, str(ROOT / "scripts"))
    import hand_sweep

    data = hand_sweep.digits()
    assert [len(split[1]) for split in data] == [1197, 300, 300]
    record = hand_sweep.job("bn", "relu", 0, data, probe_every=12)
    assert record["steps"] == DEFAULT_STEPS and len(record["val"]) == 10
    assert len(record["probes"]) == 32 and 0 < record["step_seconds"] < record["seconds"]
