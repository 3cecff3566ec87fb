"""Nothing lost, nothing misreported (issue 15): unique output dirs, signals, honest resume,
checked data files, unknown keys, atomic writes, one line instead of a traceback.

Each test drives the real command line (or sends a real signal to a real process).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli

from normlab.config import CONFIG_DIR
from normlab.train import train

QUIET = ("callbacks.progress_bar=null",)


def last_line(proc: subprocess.CompletedProcess) -> str:
    return (proc.stderr.strip().splitlines() or [""])[-1]


def assert_one_line_error(proc: subprocess.CompletedProcess, *parts: str, code: int = 2) -> str:
    assert proc.returncode == code, proc.stderr[-1500:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-1500:]
    line = last_line(proc)
    for part in parts:
        assert part in line, line
    return line


def popen(*args: str, cwd: Path = ROOT) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so a test can signal the whole group, as Ctrl-C does
    )


def wait_for(pattern: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until a file matching `pattern` (a glob) exists, while `proc` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if glob.glob(str(pattern)):
            return
        time.sleep(0.05)
    raise AssertionError(f"{pattern} never appeared (process exit {proc.poll()})")


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


# ------------------------------------------------------------------ 1. output dirs


def test_runs_started_together_get_their_own_dirs(tmp_path):
    """Four processes started at once: four different run dirs (were equal within a second)."""
    procs = [
        popen("--cfg", "hydra", "--resolve", "-p", "hydra.run.dir", cwd=tmp_path) for _ in range(4)
    ]
    dirs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert all(d.startswith("outputs/runs/") for d in dirs), dirs
    assert len(set(dirs)) == 4, dirs


@pytest.mark.slow
def test_concurrent_sweeps_keep_all_results(tmp_path):
    procs = [
        popen("-m", "norm=none", f"seed={s}", "trainer.max_epochs=1", *QUIET, cwd=tmp_path)
        for s in (0, 5)
    ]
    for proc in procs:
        proc.communicate(timeout=400)
        assert proc.returncode == 0
    found = sorted(tmp_path.glob("outputs/multirun/*/*/0/metrics.json"))
    assert len(found) == 2, found
    seeds = sorted(json.loads(p.read_text())["overrides"][1] for p in found)
    assert seeds == ["seed=0", "seed=5"]


# ------------------------------------------------------------------ 2. signals


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint_and_exits_143(tmp_path):
    run_dir = tmp_path / "term"
    proc = popen("trainer.max_epochs=500", f"hydra.run.dir={run_dir}", *QUIET)
    wait_for(run_dir / "checkpoints" / "last.ckpt", proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-1500:]
    assert "Traceback" not in err and "interrupted by SIGTERM" in err.strip().splitlines()[-1]
    record = metrics(run_dir)
    assert record["status"] == "interrupted" and record["signal"] == "SIGTERM"
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert record["checkpoint"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert saved["global_step"] > 0
    epochs = saved["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
    resumed = run_cli(
        f"trainer.max_epochs={epochs + 1}",
        f"ckpt_path={record['checkpoint']}",
        f"hydra.run.dir={tmp_path / 'resumed'}",
        *QUIET,
    )
    assert resumed.returncode == 0, resumed.stderr[-1500:]
    assert metrics(tmp_path / "resumed")["epochs"] == epochs + 1


@pytest.mark.slow
@pytest.mark.parametrize(("launcher", "group"), [("basic", False), ("joblib", True),
                                                 ("local", False), ("local", True)])
def test_signal_stops_a_sweep_with_its_summary(tmp_path, launcher, group):
    """SIGTERM to the launching process alone (a scheduler), or SIGINT to the process group
    (Ctrl-C), workers included: each running job saves and stops, jobs not started are skipped,
    summary.md lists them, the exit code names the signal."""
    sweep = tmp_path / "sweep"
    proc = popen("-m", f"hydra/launcher={launcher}", "norm=none,bn,custom_bn",
                 "trainer.max_epochs=500", f"hydra.sweep.dir={sweep}", *QUIET)
    wait_for(sweep / "*" / "checkpoints" / "last.ckpt", proc)
    time.sleep(1.0)
    if group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    expected = ("SIGINT", 130) if group else ("SIGTERM", 143)
    assert proc.returncode == expected[1], err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    summary = (sweep / "summary.md").read_text()
    records = [metrics(d) for d in sorted(sweep.iterdir()) if (d / "metrics.json").is_file()]
    assert records and all(r["status"] == "interrupted" for r in records)
    assert any(r["checkpoint"] for r in records)
    for record in records:
        if record["checkpoint"]:
            torch.load(record["checkpoint"], weights_only=True)
    assert f"interrupted ({expected[0]})" in summary
    assert f"{len(records)} interrupted" in summary


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    proc = popen("trainer.max_epochs=500", f"hydra.run.dir={run_dir}", *QUIET)
    wait_for(run_dir / ".hydra", proc)  # Hydra set up the run; torch is still being imported
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-1500:]
    assert "Traceback" not in err, err[-1500:]
    assert err.strip().splitlines()[-1].startswith("normlab: interrupted by SIGINT")


# ------------------------------------------------------------------ 3. resume


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    from conftest import compose_cfg

    run_dir = tmp_path_factory.mktemp("one_epoch")
    train(compose_cfg(run_dir, "trainer.max_epochs=1"))
    return run_dir


@pytest.mark.parametrize(
    ("override", "parts"),
    [
        ("lr=0.5", ("optimizer settings", "lr=0.5 (checkpoint: 0.01)")),
        (
            "activation=sigmoid",
            ("architecture", "activation._target_='torch.nn.Sigmoid'", "'torch.nn.ReLU'"),
        ),
        ("model.hidden_sizes=[16]", ("architecture", "model.hidden_sizes=[16]")),
    ],
)
def test_resume_with_other_settings_is_refused(one_epoch, tmp_path, override, parts):
    ckpt = one_epoch / "checkpoints" / "last.ckpt"
    proc = run_cli(override, "trainer.max_epochs=2", f"ckpt_path={ckpt}",
                   f"hydra.run.dir={tmp_path / 'r'}")  # fmt: skip
    assert_one_line_error(proc, f"ckpt_path={ckpt}", *parts, "drop ckpt_path")
    assert not (tmp_path / "r").exists()


def test_resuming_a_finished_run_changes_nothing(one_epoch):
    before = (one_epoch / "metrics.json").read_bytes()
    ckpt = one_epoch / "checkpoints" / "last.ckpt"
    proc = run_cli("trainer.max_epochs=1", f"ckpt_path={ckpt}", f"hydra.run.dir={one_epoch}")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert "already trained 1 epoch(s)" in last_line(proc) and "nothing to do" in last_line(proc)
    assert (one_epoch / "metrics.json").read_bytes() == before


def test_checkpoint_stores_its_config_readable_with_weights_only(one_epoch):
    saved = torch.load(one_epoch / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["normlab_config"]["lr"] == 0.01
    assert saved["normlab_config"]["activation"] == {"_target_": "torch.nn.ReLU"}


# ------------------------------------------------------------------ 4. data files


def write_mnist_raw(raw: Path, n_train_images: int, n_train_labels: int) -> None:
    import struct

    raw.mkdir(parents=True)
    for prefix, n_img, n_lab in (("train", n_train_images, n_train_labels), ("t10k", 20, 20)):
        header = struct.pack(">IIII", 2051, n_img, 28, 28)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + bytes(n_img * 784))
        labels = struct.pack(">II", 2049, n_lab) + bytes(i % 10 for i in range(n_lab))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(labels)


@pytest.mark.slow  # spawns processes: in CI's `pytest -m slow`, out of the default run
def test_mnist_with_fewer_labels_than_images_is_one_line(tmp_path):
    write_mnist_raw(tmp_path / "data" / "MNIST" / "raw", 60, 50)
    proc = run_cli("data=mnist", f"paths.data_dir={tmp_path / 'data'}",
                   f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    assert_one_line_error(proc, "train-labels-idx1-ubyte holds 50 labels", "60 images", code=1)


# ------------------------------------------------------------------ 5. own config folder


@pytest.mark.slow  # two CLI runs (subprocesses)
@pytest.mark.parametrize("how", ["searchpath", "config-dir"])
def test_experiment_in_ones_own_folder(tmp_path, how):
    folder = tmp_path / "myconf"
    (folder / "experiment").mkdir(parents=True)
    (folder / "experiment" / "mine.yaml").write_text("# @package _global_\nlr: 0.02\n")
    where = ["--config-dir", str(folder)]
    if how == "searchpath":
        where = [f"hydra.searchpath=[file://{folder}]"]
    run_dir = tmp_path / "run"
    proc = run_cli(*where, "experiment=mine", "trainer.max_epochs=1", f"hydra.run.dir={run_dir}",
                   *QUIET)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "lr: 0.02" in (run_dir / ".hydra" / "config.yaml").read_text()
    # and its choices are listed with normlab's own when one is misspelt
    proc = run_cli(*where, "experiment=mien", f"hydra.run.dir={tmp_path / 'r2'}")
    assert_one_line_error(proc, "experiment='mien' is not valid", "mine", "lab09_init")


# ------------------------------------------------------------------ 6. config keys, YAML, seed


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("learning_rate: 0.5\n", ("unknown config key 'learning_rate'", "nearest valid keys: lr")),
        (
            "defaults:\n  - override /init: normal\ninit:\n  stdd: 0.01\n",
            ("unknown config key 'init.stdd'", "nearest valid keys: init.std"),
        ),
        ("lr: 0.02\n  oops: : 1\n", ("invalid YAML in", "typo.yaml line 3")),
    ],
)
def test_experiment_file_mistakes_are_one_line(tmp_path, text, parts):
    # in normlab's own conf/experiment/, as a user of a checkout would write it
    name = f"_test_typo_{os.getpid()}"
    path = CONFIG_DIR / "experiment" / f"{name}.yaml"
    path.write_text("# @package _global_\n" + text)
    try:
        proc = run_cli(f"experiment={name}", f"hydra.run.dir={tmp_path / 'run'}")
    finally:
        path.unlink()
    assert_one_line_error(proc, *(p.replace("typo.yaml", f"{name}.yaml") for p in parts))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "parts"),
    [
        (("learning_rate=0.5",), ("unknown config key 'learning_rate'", "lr", "+learning_rate")),
        (("data.batchsize=8",), ("unknown config key 'data.batchsize'", "data.batch_size")),
        (("seed=-1",), ("seed=-1 is out of range", "[0, 2**32)")),
        (("-m", "seed=0,4294967296"), ("seed=4294967296 is out of range",)),
    ],
)
def test_command_line_mistakes_are_one_line(tmp_path, args, parts):
    proc = run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 's'}")
    assert_one_line_error(proc, *parts)
    assert not (tmp_path / "run").exists() and not (tmp_path / "s").exists()


# ------------------------------------------------------------------ 7. atomic writes


@contextlib.contextmanager
def tmpfs(mount: Path, options: str):
    """A tmpfs mounted at `mount` with `options` for the `with` body (skips without root)."""
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"needs root to mount a tmpfs ({options})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.fixture
def small_filesystem(tmp_path):
    with tmpfs(tmp_path / "small", "size=300k") as mount:
        yield mount


def fill(mount: Path, leave: int) -> None:
    free = shutil.disk_usage(mount).free
    (mount / "filler").write_bytes(bytes(max(0, free - leave)))


@pytest.mark.slow  # spawns processes: in CI's `pytest -m slow`, out of the default run
def test_full_disk_keeps_the_last_checkpoint_and_leaves_no_temp_files(small_filesystem):
    from conftest import compose_cfg

    run_dir = small_filesystem / "run"
    train(compose_cfg(run_dir, "trainer.max_epochs=1"))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    fill(small_filesystem, leave=32 * 1024)  # less than one checkpoint
    proc = run_cli("trainer.max_epochs=3", f"ckpt_path={ckpt}", f"hydra.run.dir={run_dir}", *QUIET)
    assert_one_line_error(proc, "no space left on the device", code=1)
    assert ckpt.read_bytes() == before
    torch.load(ckpt, weights_only=True)
    assert not [p.name for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


def test_full_output_filesystem_is_refused_up_front(small_filesystem):
    fill(small_filesystem, leave=0)
    proc = run_cli(f"hydra.run.dir={small_filesystem / 'run'}")
    assert_one_line_error(proc, "the filesystem is full")


# ------------------------------------------------------------------ 8. one line, not a traceback


def test_unwritable_run_dir_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_cli(f"hydra.run.dir={blocker / 'run'}")
    assert_one_line_error(proc, f"hydra.run.dir={blocker / 'run'}", "is not a directory")


def test_read_only_output_dir_is_one_line(tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=64k") as mount:
        proc = run_cli(f"hydra.run.dir={mount / 'run'}")
    assert_one_line_error(proc, "cannot create it", "is not writable")


def test_random_bytes_checkpoint_is_one_line_without_unsafe_advice(tmp_path):
    ckpt = tmp_path / "random.ckpt"
    ckpt.write_bytes(os.urandom(4096))
    proc = run_cli(f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(proc, f"ckpt_path={ckpt}: not a loadable checkpoint")
    assert "weights_only" not in proc.stderr


def test_report_names_an_unreadable_metrics_file_and_goes_on(tmp_path):
    for job, text in (("0", '{"status": "ok", "val/acc": 0.5, "overrides": ["seed=0"]}'),
                      ("1", '{"status": "ok", "val/a')):  # fmt: skip
        (tmp_path / job).mkdir()
        (tmp_path / job / "metrics.json").write_text(text)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "report.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr
    assert f"{tmp_path / '1' / 'metrics.json'}: unreadable" in proc.stderr
    assert (tmp_path / "report.csv").is_file()
