"""Exact mid-epoch resume (issue 21): a run stopped at any optimizer step -- at an epoch's start,
mid-epoch, inside a `data.steps_per_batch` stack -- and resumed from its last.ckpt ends with the
weights of the straight run, bit for bit (the loader keeps its position in the checkpoint)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import compose_cfg
from lightning.pytorch.callbacks import Callback
from omegaconf import open_dict

from normlab.data.batches import TensorBatches
from normlab.run import signals
from normlab.run.signals import RunInterrupted
from normlab.train import train


class SignalAtStep(Callback):
    """Acts as a SIGTERM arriving during optimizer step `step` (checked at the batch's end)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step >= self.step and signals.received() is None:
            signals._State.signum = signal.SIGTERM


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def run(tmp_path: Path, name: str, *overrides: str, stop_at: int | None = None) -> Path:
    cfg = compose_cfg(tmp_path / name, "logger=csv", *overrides)
    if stop_at is None:
        train(cfg)
        return tmp_path / name / "checkpoints" / "last.ckpt"
    with open_dict(cfg):
        cfg.callbacks["cut"] = {"_target_": f"{__name__}.SignalAtStep", "step": stop_at}
    try:
        with pytest.raises(RunInterrupted):
            train(cfg)
    finally:
        signals._State.signum = None
    return tmp_path / name / "checkpoints" / "last.ckpt"


def test_loader_state_skips_the_trained_batches():
    x, y = torch.arange(40.0).view(20, 2), torch.arange(20)
    loader = TensorBatches(x, y, 4, train=True, seed=3)
    loader.set_epoch(2)
    straight = [b.y.tolist() for b in loader]
    loader.load_state_dict({"epoch": 2, "batches": 3, "seed": 3})
    loader.set_epoch(2)
    assert [b.y.tolist() for b in loader] == straight[3:]
    assert loader.state_dict()["batches"] == len(straight)
    assert [b.y.tolist() for b in loader] == straight  # the position applies once


# digits: 37 optimizer steps per epoch; 3 epochs = 111 steps
@pytest.mark.parametrize(
    ("per_batch", "stop_at"),
    [(1, 38), (1, 55), (3, 50), (3, 80)],
    ids=["epoch-start", "mid-epoch", "stack-mid-epoch", "stack-last-epoch"],
)
def test_interrupt_and_resume_is_the_straight_run_bitwise(tmp_path, per_batch, stop_at):
    common = ("trainer.max_epochs=3", f"data.steps_per_batch={per_batch}")
    straight = run(tmp_path, "straight", *common)
    cut = run(tmp_path, "cut", *common, stop_at=stop_at)
    saved = torch.load(cut, map_location="cpu", weights_only=True)
    total = torch.load(straight, weights_only=True)["global_step"]
    assert 0 < saved["global_step"] < total
    resumed = run(tmp_path, "resumed", *common, f"ckpt_path={cut}")
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), f"stopped at step {saved['global_step']}"
    assert torch.load(resumed, weights_only=True)["global_step"] == total
