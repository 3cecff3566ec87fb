"""The local launcher (the default for `-m`): jobs on every core, each exactly as run alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, compose_config, event_tags, run_cli
from omegaconf import DictConfig, OmegaConf

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


def forkservers() -> set[int]:
    """The pids of every multiprocessing forkserver on this machine."""
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"multiprocessing.forkserver import main" in cmdline.read_bytes():
                found.add(int(cmdline.parent.name))
        except OSError:  # ended meanwhile
            pass
    return found


@pytest.mark.slow  # a sweep and two lone runs, each a fresh process
def test_sweep_jobs_run_on_both_cores_with_the_numbers_of_lone_runs(tmp_path):
    sweep = tmp_path / "sweep"
    servers_before = forkservers()
    out = lone_cli("-m", "norm=none,bn", "trainer.max_epochs=2", f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert forkservers() <= servers_before  # the sweep's server ended with it
    assert "2 jobs locally, 2 at a time" in out.stdout + out.stderr
    assert "2 jobs: 2 ok" in out.stdout and f"tensorboard --logdir {sweep}" in out.stdout
    jobs = {json.loads((d / "metrics.json").read_text())["hparams"]["norm"]: d
            for d in sweep.iterdir() if (d / "metrics.json").is_file()}
    assert set(jobs) == {"none", "bn"}
    workers = event_pids(jobs["none"]) | event_pids(jobs["bn"])
    assert len(workers) == 2  # two worker processes
    # the comparison figures: drawn on the workers, in two parts (two event files)
    assert event_pids(sweep / "tensorboard" / "_sweep") == workers
    assert set(event_tags(sweep / "tensorboard" / "_sweep")["images"]) == {
        "comparison/ics_bands", "comparison/accuracy", "comparison/gradient_profile",
        "comparison/rank"}
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


class CountingLoader:
    """A config loader that counts what it composes (stands in for Hydra's)."""

    def __init__(self) -> None:
        self.composed: list[list[str]] = []

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]):
        self.composed.append(list(sweep_overrides))
        return OmegaConf.create({"hydra": {"job": {"id": None, "num": None}},
                                 "seed": sweep_overrides[0]})


def test_each_job_is_composed_once_for_the_sweeper_and_the_launcher():
    loader = CountingLoader()
    launcher = LocalLauncher()
    launcher.setup(hydra_context=SimpleNamespace(config_loader=loader), task_function=print,
                   config=OmegaConf.create())
    batch = [["seed=0"], ["seed=1"], ["seed=2"]]
    for overrides in batch[:2]:  # the sweeper's check of the batch (validate_batch_is_legal)
        loader.load_sweep_config(OmegaConf.create(), overrides)
    configs = launcher._job_configs(batch, 5)
    assert loader.composed == batch  # the two checked jobs were not composed again
    assert [c.seed for c in configs] == ["seed=0", "seed=1", "seed=2"]
    assert [(c.hydra.job.id, c.hydra.job.num) for c in configs] == [(5, 5), (6, 6), (7, 7)]
    assert launcher.composed == {}  # nothing kept once launched


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
