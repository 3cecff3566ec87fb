"""Shared test helpers: compose the real configs, run the real CLI, read event files."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from normlab.config import CONFIG_DIR
from normlab.models.from_config import component
from normlab.validate import group_choices

ROOT = Path(__file__).resolve().parents[1]

# Two cores: one torch thread per process, or parallel processes crawl.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def compose_cfg(tmp_path: Path, *overrides: str) -> DictConfig:
    """The real `train` config with overrides, writing into tmp_path (no Hydra run needed)."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"paths.output_dir={tmp_path}",
                f"paths.data_dir={tmp_path / 'data'}",
                *overrides,
            ],
        )
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
    an init function (None for init=default) -- with `options` overriding its keys."""
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
    """Histogram and scalar tags in all TensorBoard event files under `directory`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, set[str]] = {"histograms": set(), "scalars": set()}
    for folder in {p.parent for p in directory.rglob("events.out.tfevents.*")}:
        accumulator = EventAccumulator(str(folder), size_guidance={"histograms": 0, "scalars": 0})
        accumulator.Reload()
        for kind in tags:
            tags[kind].update(accumulator.Tags().get(kind, []))
    return tags
