"""Bad data is an error, never a result (issue 21): data that cannot train is refused before
training with one line naming the files or the key, exit 2; a run of 0 optimizer steps is never ok.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from normlab.data.checks import BadDataError, check_splits
from normlab.data.registry import Splits

QUIET = ("callbacks.progress_bar=null", "logger=csv")


def write_mnist(raw: Path, images: bytes, labels: list[int]) -> None:
    raw.mkdir(parents=True)
    n = len(labels)
    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28)
                                                          + images)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n)
                                                          + bytes(labels))


def splits(y: torch.Tensor, x: torch.Tensor | None = None) -> Splits:
    x = torch.randn(len(y), 1, 2, 2) if x is None else x
    return Splits((x, y), (x, y), (x, y))


@pytest.mark.parametrize(
    ("data", "batch", "part"),
    [
        (splits(torch.tensor([0, 1, 10])), 2, "1 train label(s) outside the 10 classes"),
        (splits(torch.tensor([0, 1, -1])), 2, "e.g. -1"),
        (splits(torch.tensor([0, 1]), torch.full((2, 1, 2, 2), float("nan"))), 2, "NaN or inf"),
        (splits(torch.tensor([0, 1, 2])), 4, "data.batch_size=4 is larger than the training set"),
        (splits(torch.tensor([], dtype=torch.int64)), 1, "cannot be empty"),
    ],
    ids=["label-too-big", "negative-label", "nan-input", "batch-too-big", "empty"],
)
def test_data_that_cannot_train_is_one_line(data, batch, part):
    with pytest.raises(BadDataError) as error:
        check_splits(data, where="data.name=x", num_classes=10, batch_size=batch)
    assert part in str(error.value) and "data.name=x" in str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "part"),
    [
        ("labels", "train label(s) outside the 10 classes 0..9 (e.g. 11)"),
        ("constant", "NaN or inf after standardization"),
        ("batch", "data.batch_size=5000 is larger than the training set"),
    ],
)
def test_bad_data_is_refused_before_training_exit_2(tmp_path, args, part):
    data = tmp_path / "data"
    rng = torch.Generator().manual_seed(0)
    if args == "labels":
        pixels = torch.randint(0, 256, (60 * 784,), generator=rng, dtype=torch.uint8)
        write_mnist(data / "MNIST" / "raw", bytes(pixels.tolist()),
                    [11] + [i % 10 for i in range(59)])
    elif args == "constant":
        write_mnist(data / "MNIST" / "raw", bytes(60 * 784), [i % 10 for i in range(60)])
    extra = ["data.batch_size=5000"] if args == "batch" else ["data=mnist"]
    proc = run_cli(*extra, f"paths.data_dir={data}", f"hydra.run.dir={tmp_path / 'run'}", *QUIET)
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert part in line, line
    assert "data.name=" in line or "data.batch_size" in line
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # refused before training
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_a_run_of_zero_steps_is_never_ok(tmp_path):
    proc = run_cli("trainer.max_epochs=0", f"hydra.run.dir={tmp_path}", *QUIET)
    assert proc.returncode != 0, proc.stderr[-1500:]
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "failed" and "0 optimizer steps" in record["error"]
