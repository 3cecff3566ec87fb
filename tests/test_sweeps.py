"""Sweeps through the real CLI: failed and diverged jobs, launchers, DDP, report, experiments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, compose_config, run_cli
from hydra.utils import instantiate

from normlab.results.runs import collect_jobs

JOBLIB = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
QUIET = ["~callbacks.progress_bar", "trainer.enable_progress_bar=false"]
EXPERIMENTS = ["lab09_mnist_bn", "cifar10_mlp", "lab09_activation", "lab09_init", "lab09_dropout"]


def sweep(sweep_dir: Path, *overrides: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return run_cli("-m", f"hydra.sweep.dir={sweep_dir}", *QUIET, *overrides, cwd=cwd)


def jobs_by_override(sweep_dir: Path, key: str) -> dict[str, dict]:
    """metrics.json of each job keyed by the value of `key=` in its overrides."""
    found = {}
    for job in collect_jobs(sweep_dir):
        values = [o.split("=", 1)[1] for o in job["overrides"] if o.startswith(f"{key}=")]
        found[values[0]] = job
    return found


# ------------------------------------------------------------------ failure isolation


@pytest.mark.slow  # two real sweeps of 3 jobs each
@pytest.mark.parametrize("launcher", [[], JOBLIB], ids=["local", "joblib"])
def test_a_failed_job_does_not_stop_the_sweep(tmp_path, launcher):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = sweep(tmp_path / "s", "data=digits,mnist", f"paths.data_dir={empty}",
                "trainer.max_epochs=1", *launcher)
    assert out.returncode != 0, out.stdout[-2000:]
    jobs = jobs_by_override(tmp_path / "s", "data")
    assert jobs["digits"]["status"] == "ok" and jobs["digits"]["val/acc"] > 0.5
    failed = jobs["mnist"]
    assert failed["status"] == "failed"
    assert "MNIST" in failed["error"] and "train-images-idx3-ubyte" in failed["error"]
    assert str(empty) in failed["error"]
    summary = (tmp_path / "s" / "summary.md").read_text()
    assert "2 jobs: 1 ok, 1 failed" in summary and "failed: DatasetMissingError" in summary
    assert "1 job(s) failed" in out.stderr


@pytest.mark.slow  # spawns processes: in CI's `pytest -m slow`, out of the default run
def test_a_diverging_job_is_stopped_and_recorded(tmp_path):
    out = sweep(tmp_path / "s", "lr=0.01,1e20", "init=normal", "norm=none", "trainer.max_epochs=2")
    assert out.returncode == 0, out.stderr[-2000:]  # diverged is a result, not a failure
    jobs = {float(lr): job for lr, job in jobs_by_override(tmp_path / "s", "lr").items()}
    ok, diverged = jobs[0.01], jobs[1e20]
    assert ok["status"] == "ok" and "diverged_at_step" not in ok
    assert diverged["status"] == "diverged"
    assert 1 <= diverged["diverged_at_step"] <= diverged["steps"] < ok["steps"]
    summary = (tmp_path / "s" / "summary.md").read_text()
    assert f"diverged at step {diverged['diverged_at_step']}" in summary


def test_a_job_that_died_without_metrics_is_listed_as_failed(tmp_path):
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text("- seed=3\n")
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "metrics.json").write_text(json.dumps({"status": "ok", "overrides": []}))
    jobs = collect_jobs(tmp_path)
    assert [j["job"] for j in jobs] == ["0", "1"]
    assert jobs[0]["status"] == "failed" and jobs[0]["overrides"] == ["seed=3"]
    assert "no metrics.json" in jobs[0]["error"]


# ------------------------------------------------------------------ joblib + report


@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """lab09_mnist_bn on digits, 2 seeds, through joblib: 4 jobs in 2 norm groups."""
    sweep_dir = tmp_path_factory.mktemp("joblib") / "s"
    out = sweep(sweep_dir, *JOBLIB, "experiment=lab09_mnist_bn", "data=digits", "seed=0,1",
                "trainer.max_epochs=2")
    return sweep_dir, out


@pytest.mark.slow  # spawns processes: in CI's `pytest -m slow`, out of the default run
def test_joblib_launcher_runs_a_four_job_sweep(joblib_sweep):
    sweep_dir, out = joblib_sweep
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Joblib.Parallel(n_jobs=2,backend=loky" in out.stdout + out.stderr
    jobs = collect_jobs(sweep_dir)
    assert [j["status"] for j in jobs] == ["ok"] * 4
    combos = {tuple(sorted(o for o in j["overrides"] if o.split("=")[0] in ("norm", "seed")))
              for j in jobs}
    assert combos == {(f"norm={n}", f"seed={s}") for n in ("none", "bn") for s in (0, 1)}
    # event files are named ...<host>.<pid>.<n>: the jobs ran in (at most 2) loky workers
    events = sweep_dir.glob("[0-9]*/tensorboard/*/events.out.tfevents.*")
    pids = {p.name.split(".")[-2] for p in events}
    assert 1 <= len(pids) <= 2
    assert "4 jobs: 4 ok" in (sweep_dir / "summary.md").read_text()


@pytest.mark.slow  # spawns processes: in CI's `pytest -m slow`, out of the default run
def test_report_on_a_real_sweep(joblib_sweep):
    sweep_dir, _ = joblib_sweep
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(sweep_dir)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    table = pd.read_csv(sweep_dir / "report.csv")
    assert list(table["group"]) == ["norm=none", "norm=bn"]
    assert list(table["n_seeds"]) == [2, 2] and list(table["n_ok"]) == [2, 2]
    for column in ("val/acc", "test/acc", "train/loss"):
        assert table[f"{column} mean"].between(0, 10).all() and table[f"{column} std"].notna().all()
    rows = [line for line in out.stdout.splitlines() if line.startswith("| norm=")]
    assert len(rows) >= 2 and "±" in rows[0]
    for name in ("report_curves.png", "report_ics.png"):
        data = (sweep_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


# ------------------------------------------------------------------ SLURM and DDP


def test_submitit_slurm_config_composes_and_reaches_sbatch(tmp_path, monkeypatch):
    """No SLURM here: compose, instantiate the launcher, read the sbatch script it would submit."""
    import submitit

    cfg = compose_config(
        "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=30", f"hydra.sweep.dir={tmp_path}", hydra=True,
    )
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert launcher.params["partition"] == "gpu" and launcher.params["gpus_per_node"] == 1
    launcher.setup(hydra_context=None, task_function=lambda cfg: None, config=cfg)

    fake_bin = tmp_path / "bin"  # submitit checks that srun exists before building its executor
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{Path(sys.executable).parent}:/usr/bin:/bin")
    captured = {}

    def fake_map_array(executor, fn, *args):
        captured["executor"], captured["jobs"] = executor, list(zip(*args, strict=True))
        raise InterruptedError  # stop before anything is submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", fake_map_array)
    with pytest.raises(InterruptedError):
        launcher.launch([["norm=none"], ["norm=bn"]], initial_job_idx=0)
    assert len(captured["jobs"]) == 2
    script = captured["executor"]._executor._make_submission_file_text("python job.py", "uid")
    for line in ("--partition=gpu", "--time=30", "--gpus-per-node=1", "--cpus-per-task=8",
                 "--mem=32GB"):
        assert f"#SBATCH {line}" in script


def test_ddp_cpu_trainer_spawns_instead_of_relaunching_the_script(make_cfg):
    cfg = make_cfg("trainer=ddp_cpu")
    assert cfg.trainer.strategy == "ddp_spawn" and cfg.trainer.devices == 2


@pytest.mark.slow  # 2 jobs x 2 spawned processes: 1-3 min on 2 shared cores
def test_ddp_cpu_in_a_multirun_leaves_one_dir_per_job(tmp_path):
    out = sweep(tmp_path / "s", "trainer=ddp_cpu", "seed=0,1", "trainer.max_epochs=1",
                cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    dirs = sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir())
    assert dirs == ["0", "1", "tensorboard"]  # the jobs and the sweep's _sweep run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no stray outputs/ from ranks
    assert [j["status"] for j in collect_jobs(tmp_path / "s")] == ["ok", "ok"]


# ------------------------------------------------------------------ experiments


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_with_digits(name):
    cfg = compose_config(f"experiment={name}", "data=digits", hydra=True)
    assert cfg.data.name == "digits"
    for key, values in (cfg.hydra.sweeper.params or {}).items():
        for value in values.split(","):
            compose_config(f"experiment={name}", "data=digits", f"{key}={value}")


def test_optuna_sweeper_config_composes_when_the_plugin_is_installed():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")  # optional: hydra-optuna-sweeper
    cfg = compose_config("hydra/sweeper=optuna_lr_dropout", hydra=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper.direction == "maximize" and set(sweeper.params) == {"lr", "dropout"}
    assert type(instantiate(sweeper)).__name__ == "OptunaSweeper"
