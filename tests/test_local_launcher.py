"""The local launcher (the default for `-m`): jobs on every core, each exactly as run alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config, run_cli

from hydra_plugins.normlab_local.local_launcher import LocalLauncher, workers_for

NUMBERS = ("val/acc", "val/loss", "test/acc", "test/loss", "train/loss", "steps", "epochs")


def lone_cli(*args: str) -> subprocess.CompletedProcess:
    """`python train.py ARGS` with torch's default threads, as a researcher runs it."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "HYDRA_FULL_ERROR")}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def event_pids(job_dir: Path) -> set[str]:
    """The process ids in the job's TensorBoard event file names (...<host>.<pid>.<n>)."""
    return {p.name.split(".")[-2] for p in job_dir.rglob("events.out.tfevents.*")}


@pytest.mark.slow  # a sweep and two lone runs, each a fresh process
def test_sweep_jobs_run_on_both_cores_with_the_numbers_of_lone_runs(tmp_path):
    sweep = tmp_path / "sweep"
    out = lone_cli("-m", "norm=none,bn", "trainer.max_epochs=2", f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 jobs locally, 2 at a time" in out.stdout + out.stderr
    jobs = {json.loads((d / "metrics.json").read_text())["hparams"]["norm"]: d
            for d in sweep.iterdir() if (d / "metrics.json").is_file()}
    assert set(jobs) == {"none", "bn"}
    assert len(event_pids(jobs["none"]) | event_pids(jobs["bn"])) == 2  # two worker processes
    for norm, job_dir in jobs.items():
        alone = tmp_path / f"alone_{norm}"
        ran = lone_cli(f"norm={norm}", "trainer.max_epochs=2", f"hydra.run.dir={alone}")
        assert ran.returncode == 0, ran.stderr[-2000:]
        in_sweep = json.loads((job_dir / "metrics.json").read_text())
        by_itself = json.loads((alone / "metrics.json").read_text())
        assert {k: in_sweep[k] for k in NUMBERS} == {k: by_itself[k] for k in NUMBERS}
        assert in_sweep["ics"] == by_itself["ics"]
        a = torch.load(job_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        b = torch.load(alone / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_worker_per_core_for_cpu_jobs():
    cores = len(os.sched_getaffinity(0))
    assert workers_for(compose_config()) == cores
    assert workers_for(compose_config("trainer=ddp_cpu", "trainer.devices=2")) == max(1, cores // 2)


def test_jobs_on_an_accelerator_run_one_at_a_time():
    assert workers_for(compose_config("trainer=gpu")) == 1


@pytest.mark.parametrize("workers", [0, -1, True])
def test_a_bad_worker_count_is_refused_naming_the_key(workers):
    with pytest.raises(ValueError, match=r"hydra.launcher.workers=.* must be >= 1"):
        LocalLauncher(workers=workers)


def test_a_bad_worker_count_on_the_command_line_is_one_line(tmp_path):
    proc = run_cli("-m", "norm=none,bn", "hydra.launcher.workers=0",
                   f"hydra.sweep.dir={tmp_path / 's'}")
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "normlab: error: hydra.launcher.workers=0 must be >= 1 (or null: one per core)")
