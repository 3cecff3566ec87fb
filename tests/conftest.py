"""Shared test helpers: compose the real configs, run the real CLI, read event files, serve them
with TensorBoard on a free port."""

from __future__ import annotations

import copy
import functools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from normlab.config import CONFIG_DIR
from normlab.config.validate import group_choices
from normlab.models.from_config import component

ROOT = Path(__file__).resolve().parents[1]

# Two cores: one torch thread per process, or parallel processes crawl.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def compose_config(*overrides: str, hydra: bool = False) -> DictConfig:
    """The real `train` config with overrides, as Hydra composes it (with its `hydra` node when
    `hydra=True`). The one composer of the tests."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


def compose_cfg(tmp_path: Path, *overrides: str) -> DictConfig:
    """`compose_config` writing into tmp_path, without a progress bar: ready for `train(cfg)`."""
    cfg = compose_config(f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}",
                         *overrides)
    with open_dict(cfg):  # no progress bar in test logs
        if cfg.get("callbacks"):
            cfg.callbacks.pop("progress_bar", None)
        cfg.trainer.enable_progress_bar = False
    return cfg


def choices(group: str) -> list[str]:
    """The choices of conf/<group>/ (tests iterate over these, never over a list of names)."""
    return group_choices(CONFIG_DIR, group)


@functools.lru_cache
def _composed(group: str, choice: str) -> DictConfig:
    return compose_cfg(Path("/nonexistent"), f"{group}={choice}")


def part(group: str, choice: str, **options):
    """The component `group=choice` as train() builds it -- a norm factory, an activation factory,
    an init function -- with `options` overriding its keys."""
    cfg = copy.deepcopy(_composed(group, choice))
    with open_dict(cfg):
        for key, value in options.items():
            cfg[group][key] = value
    return component(cfg, group)


@pytest.fixture
def make_cfg(tmp_path: Path):
    return lambda *overrides: compose_cfg(tmp_path, *overrides)


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in a subprocess with one torch thread; output captured as text."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "MPLBACKEND": "Agg"}
    env.pop("HYDRA_FULL_ERROR")
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )



def cli_error(*args: str) -> str:
    """`python train.py ARGS` must fail with one line and no traceback: that line."""
    proc = run_cli(*args)
    assert proc.returncode != 0, proc.stdout[-500:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
    return proc.stderr.strip().splitlines()[-1]

def assert_identical(a, b) -> None:
    """Nested dicts/lists/tuples of tensors and plain values are equal, tensors bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_identical(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_identical(x, y)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    else:
        assert a == b


def event_tags(directory: Path) -> dict[str, set[str]]:
    """Histogram, scalar and image tags in all TensorBoard event files under `directory`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, set[str]] = {"histograms": set(), "scalars": set(), "images": set()}
    for folder in {p.parent for p in directory.rglob("events.out.tfevents.*")}:
        accumulator = EventAccumulator(str(folder), size_guidance=dict.fromkeys(tags, 0))
        accumulator.Reload()
        for kind in tags:
            tags[kind].update(accumulator.Tags().get(kind, []))
    return tags


# ---------------------------------------------------------------- TensorBoard server


def free_port() -> int:
    """A local TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, body: dict | None = None, timeout: float = 30) -> Any:
    """GET `url` (POST `body` as JSON when given) and decode the JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_for_json(url: str, ready: Callable[[Any], bool], timeout: float = 120) -> Any:
    """Poll `url` until its JSON answer is `ready` (a server still starting counts as not)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = get_json(url)
            if ready(answer):
                return answer
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}: not ready in {timeout} s")
        time.sleep(1)


@contextmanager
def tensorboard_server(logdir: Path) -> Iterator[str]:
    """`tensorboard --logdir logdir` on a free local port; yields its `http://.../data` base."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}/data"
    finally:
        server.terminate()
        server.wait(timeout=30)
