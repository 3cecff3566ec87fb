import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, choices, cli_error, run_cli

from normlab.train import train

BAD_INPUTS = [
    ("norm=foo", f"norm='foo' is not valid; choose one of: {', '.join(choices('norm'))}"),
    ("data=foo", "data='foo' is not valid; choose one of: cifar10, digits, fashion_mnist, mnist"),
    ("activation=foo",
     f"activation='foo' is not valid; choose one of: {', '.join(choices('activation'))}"),
    ("init=foo", "init='foo' is not valid; choose one of: default, he_normal"),
    ("dropout=1.5", "dropout=1.5 is out of range: it must be in [0, 1)"),
    ("dropout=-0.1", "dropout=-0.1 is out of range: it must be in [0, 1)"),
    ("dropout=abc", "dropout='abc' must be a number"),
    ("lr=-1", "lr=-1 is out of range: it must be > 0"),
    ("lr=0", "lr=0 is out of range: it must be > 0"),
    ("data.batch_size=0", "data.batch_size=0 is out of range: it must be an integer >= 1"),
    ("data.batch_size=1", "data.batch_size=1: TorchBatchNorm normalizes with the statistics of"),
    ("model.hidden_sizes=[]", "model.hidden_sizes=[] is empty: give at least one size"),
    ("trainer=gpu", "trainer.accelerator=gpu: no CUDA GPU is visible on this machine"),
    ("ckpt_path=/no/such.ckpt", "ckpt_path=/no/such.ckpt: no such file"),
]


@pytest.mark.parametrize(("override", "message"), BAD_INPUTS)
def test_bad_input_is_one_clear_line(tmp_path, override, message):
    if override == "trainer=gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    last_line = cli_error(override, f"hydra.run.dir={tmp_path / 'run'}")
    assert last_line.startswith(f"normlab: error: {message}"), last_line


def test_bad_choice_in_a_sweep_is_caught_before_any_job(tmp_path):
    proc = run_cli("-m", "norm=none,foo", f"hydra.sweep.dir={tmp_path / 's'}")
    assert proc.returncode == 2 and "norm='foo' is not valid" in proc.stderr
    assert not (tmp_path / "s").exists()


def final_state(path):
    return torch.load(path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("norm", ["bn", "none"])
def test_resume_equals_straight_run(tmp_path, norm):
    from conftest import compose_cfg

    common = (f"norm={norm}", "dropout=0.3", "seed=3")
    straight = train(compose_cfg(tmp_path / "straight", *common, "trainer.max_epochs=2"))
    train(compose_cfg(tmp_path / "half", *common, "trainer.max_epochs=1"))
    resumed = train(
        compose_cfg(
            tmp_path / "resumed",
            *common,
            "trainer.max_epochs=2",
            f"ckpt_path={tmp_path / 'half' / 'checkpoints' / 'last.ckpt'}",
        )
    )
    assert_same_state(final_state(tmp_path / "straight"), final_state(tmp_path / "resumed"))
    for key in ("val/acc", "val/loss", "test/acc", "test/loss", "steps", "epochs"):
        assert straight[key] == resumed[key], key


def test_same_config_same_numbers(make_cfg, tmp_path):
    first = train(make_cfg("trainer.max_epochs=2", "dropout=0.2"))
    second = train(make_cfg("trainer.max_epochs=2", "dropout=0.2"))
    for result in (first, second):
        result.pop("train_seconds"), result.pop("setup_seconds")
    assert first == second


def test_truncated_checkpoint_gives_a_clear_error(make_cfg, tmp_path):
    train(make_cfg("trainer.max_epochs=1"))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    proc = run_cli(f"ckpt_path={broken}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # 2: refused before any work
    assert f"normlab: error: ckpt_path={broken}: not a loadable checkpoint" in proc.stderr


@pytest.mark.slow
def test_sigkill_leaves_a_loadable_checkpoint_that_resumes(tmp_path):
    run_dir = tmp_path / "killed"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(ROOT / "train.py"), "model=cnn", "seed=2", "dropout=0.1"]
    proc = subprocess.Popen(
        [*args, "trainer.max_epochs=8", f"hydra.run.dir={run_dir}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.1)  # into the next epoch (and possibly the next save)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "metrics.json").exists(), "killed too late: the run had finished"
    saved = torch.load(ckpt, weights_only=True)
    assert 1 <= saved["epoch"] + 1 < 8
    resume = subprocess.run(
        [
            *args,
            "trainer.max_epochs=8",
            f"ckpt_path={ckpt}",
            f"hydra.run.dir={tmp_path / 'resumed'}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resume.returncode == 0, resume.stderr[-1500:]
    straight = subprocess.run(
        [*args, "trainer.max_epochs=8", f"hydra.run.dir={tmp_path / 'straight'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr[-1500:]
    assert_same_state(final_state(tmp_path / "straight"), final_state(tmp_path / "resumed"))


@pytest.mark.slow
@pytest.mark.parametrize(("norm", "tolerance"), [("none", 0.01), ("bn", 0.03)])
def test_ddp_cpu_agrees_with_one_process(tmp_path, norm, tolerance):
    results = {}
    for trainer in ("cpu", "ddp_cpu"):
        run_dir = tmp_path / trainer
        proc = run_cli(
            f"trainer={trainer}",
            f"norm={norm}",
            "trainer.max_epochs=3",
            f"hydra.run.dir={run_dir}",
            timeout=400,
        )
        assert proc.returncode == 0, proc.stderr[-1500:]
        results[trainer] = json.loads((run_dir / "metrics.json").read_text())
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(results)  # no extra dirs
    assert results["cpu"]["steps"] == results["ddp_cpu"]["steps"]
    assert abs(results["cpu"]["val/acc"] - results["ddp_cpu"]["val/acc"]) <= tolerance
