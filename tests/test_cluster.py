"""On a real single-node SLURM (scripts/local_slurm.sh, issue 21): a sweep through
hydra/launcher=submitit_slurm, and a job requeued mid-training that resumes from its own
checkpoint, weights-only, and ends with the straight run's weights while the sweep waits for it.

The SLURM comes from `scripts/local_slurm.sh start` (apt-installs slurm-wlm + munge as root on
first use); where it cannot start, these tests skip with the script's last line as the reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

SLURM = ("hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=0",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2")
QUIET = ("callbacks.progress_bar=null",)


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    """The environment of a started local SLURM, or skip with why it could not start."""
    try:
        start = subprocess.run([str(ROOT / "scripts" / "local_slurm.sh"), "start"],
                               capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"local SLURM did not start: {error}")
    if start.returncode != 0:
        reason = (start.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"local SLURM did not start: {reason}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("HYDRA_FULL_ERROR", None)
    for name, value in re.findall(r"^export ([A-Z_]+)=(.*)$", start.stdout, re.MULTILINE):
        env[name] = value.replace("$PATH", os.environ.get("PATH", ""))
    return env


def train_py(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, *QUIET], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def status(job_dir: Path) -> str:
    return json.loads((job_dir / "metrics.json").read_text())["status"]


@pytest.mark.slow
def test_two_job_sweep_on_slurm_is_ok(slurm_env, tmp_path):
    sweep = train_py(slurm_env, "-m", *SLURM, "norm=none,bn", "trainer.max_epochs=2",
                     f"hydra.sweep.dir={tmp_path}")
    out, _ = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, out[-3000:]
    assert [status(tmp_path / j) for j in "01"] == ["ok", "ok"]
    assert "2 jobs: 2 ok" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_requeued_job_resumes_its_own_checkpoint_and_the_sweep_waits(slurm_env, tmp_path):
    config = ("trainer.max_epochs=40", "data.steps_per_batch=1")
    straight = train_py(slurm_env, *config, f"hydra.run.dir={tmp_path / 'straight'}")
    sweep_dir = tmp_path / "sweep"
    sweep = train_py(slurm_env, "-m", *SLURM, *config, f"hydra.sweep.dir={sweep_dir}")
    checkpoint = sweep_dir / "0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and time.monotonic() < deadline and sweep.poll() is None:
        time.sleep(0.2)
    assert checkpoint.exists(), sweep.communicate()[0][-3000:]
    time.sleep(1.5)  # mid-epoch
    job = subprocess.run(["squeue", "-h", "-o", "%A"], env=slurm_env, capture_output=True,
                         text=True).stdout.split()[0]
    subprocess.run(["scontrol", "requeue", job], env=slurm_env, check=True)
    time.sleep(5)
    assert sweep.poll() is None, "the sweep command returned before the requeued job ended"
    out, _ = sweep.communicate(timeout=900)
    straight.communicate(timeout=600)
    assert sweep.returncode == 0, out[-3000:]
    assert status(sweep_dir / "0") == "ok"
    assert "1 jobs: 1 ok" in (sweep_dir / "summary.md").read_text()
    logs = "".join(p.read_text() for p in (sweep_dir / ".submitit").rglob("*_log.*"))
    assert "interrupted by SIGTERM" in logs, "the job was not interrupted"  # it was requeued
    assert "was not set, defaulting to" not in logs  # nothing loaded with weights_only=False
    assert "weights_only=False" not in logs
    assert sorted(p.name for p in (sweep_dir / "0").rglob("*.ckpt")) == ["last.ckpt"]
    a, b = (torch.load(p / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=True)["state_dict"]
            for p in (tmp_path / "straight", sweep_dir / "0"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
