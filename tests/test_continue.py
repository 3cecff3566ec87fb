"""Sweeps that continue where they stopped, and sweep dirs that are never shared (issue 21).

A sweep run again with `hydra.sweep.dir=<its dir>` keeps the jobs that finished, resumes the
interrupted ones from their checkpoints and runs the rest; a sweep with other overrides aimed at
a dir with results is refused in one line. The summary lists every job of the sweep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, compose_config, run_cli
from omegaconf import open_dict

from normlab.results.runs import collect_jobs
from normlab.results.sweep import claim_sweep_dir, sweep_plan

QUIET = ("callbacks.progress_bar=null", "logger=csv")


def sweep_config(sweep_dir: Path, *overrides: str):
    """The config a sweep's launcher process sees (`python train.py -m OVERRIDES`)."""
    config = compose_config(f"hydra.sweep.dir={sweep_dir}", hydra=True)
    with open_dict(config):
        config.hydra.overrides.task = list(overrides)
    return config


def test_the_plan_lists_every_job():
    plan = sweep_plan(sweep_config(Path("/x"), "norm=none,bn", "seed=0,1,2"))
    assert plan["overrides"] == ["norm=none,bn", "seed=0,1,2"]
    assert len(plan["jobs"]) == 6 and plan["jobs"][5] == ["norm=bn", "seed=2"]


def test_summary_lists_jobs_never_started_and_running(tmp_path):
    claim_sweep_dir(tmp_path, sweep_config(tmp_path, "seed=0,1,2"))
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "metrics.json").write_text('{"status": "ok"}')
    (tmp_path / "1" / ".hydra").mkdir(parents=True)
    (tmp_path / "1" / ".running").write_text(
        json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "slurm_job": None}))
    rows = {row["job"]: row["status"] for row in collect_jobs(tmp_path)}
    assert rows == {"0": "ok", "1": "running", "2": "not started"}


def test_other_overrides_into_a_used_sweep_dir_are_refused(tmp_path, capsys):
    claim_sweep_dir(tmp_path, sweep_config(tmp_path, "seed=0,1"))
    claim_sweep_dir(tmp_path, sweep_config(tmp_path, "seed=0,1"))  # the same sweep: continues
    with pytest.raises(SystemExit) as stop:
        claim_sweep_dir(tmp_path, sweep_config(tmp_path, "seed=5", "norm=ln"))
    assert stop.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds the results of another sweep (seed=0,1)" in line


def test_a_sweep_dir_with_results_of_unknown_origin_is_refused(tmp_path, capsys):
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "metrics.json").write_text('{"status": "ok"}')
    with pytest.raises(SystemExit):
        claim_sweep_dir(tmp_path, sweep_config(tmp_path, "seed=0,1"))
    assert "already holds job results" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_killed_sweep_continues_without_retraining_what_finished(tmp_path, workers):
    """SIGKILL to the sweep's process (its workers die with it), then the same command again."""
    args = ["-m", "norm=none,bn", "seed=0,1,2", "trainer.max_epochs=6",
            f"hydra.launcher.workers={workers}", f"hydra.sweep.dir={tmp_path}", *QUIET]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (tmp_path / "2" / "checkpoints" / "last.ckpt").exists():
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(3.0)  # a worker that outlived the sweep would finish its 6 epochs by now
    assert not (tmp_path / "2" / "metrics.json").exists()
    assert not (tmp_path / "3" / "metrics.json").exists()
    kept = {j: (tmp_path / j / "metrics.json").read_bytes() for j in "01"}
    stamps = {j: (tmp_path / j / "metrics.json").stat().st_mtime_ns for j in "01"}
    rows = {row["job"]: row["status"] for row in collect_jobs(tmp_path)}
    beside_2 = rows.pop("3")  # with 2 workers, job 3 may have started beside job 2
    assert beside_2 in (("failed", "not started") if workers == 2 else ("not started",))
    assert rows == {"0": "ok", "1": "ok", "2": "failed", "4": "not started", "5": "not started"}
    again = run_cli(*args, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    for j in "01":  # kept as they were, not retrained
        assert (tmp_path / j / "metrics.json").read_bytes() == kept[j]
        assert (tmp_path / j / "metrics.json").stat().st_mtime_ns == stamps[j]
    assert "6 jobs: 6 ok" in (tmp_path / "summary.md").read_text()
    resumed = (tmp_path / "2" / "train.log").read_text()
    assert "Restoring states from the checkpoint" in resumed or "Restored all states" in resumed
    other = run_cli("-m", "norm=ln", "trainer.max_epochs=1", f"hydra.sweep.dir={tmp_path}",
                    *QUIET)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "holds the results of another sweep" in other.stderr.strip().splitlines()[-1]
    assert {j: (tmp_path / j / "metrics.json").read_bytes() for j in "01"} == kept


def test_hydra_job_interpolations_pass_the_checks(tmp_path):
    from normlab.config.errors import ConfigError
    from normlab.config.preflight import check_command_line

    check_command_line(["-m", "seed=${hydra:job.num}", "norm=none,bn",
                        f"hydra.sweep.dir={tmp_path}"])
    own = "ckpt_path=${hydra:sweep.dir}/${hydra:job.num}/checkpoints/last.ckpt"
    with pytest.raises(ConfigError, match="no such file"):  # one line, not a traceback
        check_command_line(["-m", own, "norm=none,bn", f"hydra.sweep.dir={tmp_path}"])
