"""The run record: what a run leaves on disk and how everything else reads it back.

One job dir holds `metrics.json` (status, final metrics, overrides, ICS summary), Hydra's
`.hydra/` and TensorBoard event files. This module is the only place that knows that schema:
writing `metrics.json`, listing the job dirs of a sweep, reading one job, reading the scalars of
the event files, ordering layer names and parsing overrides. The sweep summary, the report,
the figures and the ICS summaries all go through it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from statistics import fmean
from typing import Any

from normlab.results.checksums import use_native_crc32c

# Final metrics of a run, in the order tables show them.
METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc",
           # with callbacks=precise_bn: the same evaluation with the EMA running statistics
           "val/loss_ema", "val/acc_ema", "test/loss_ema", "test/acc_ema")
STATUSES = ("ok", "diverged", "failed", "interrupted", "running", "not started")
FINISHED = ("ok", "diverged")  # a continued sweep keeps these jobs as they are
RUNNING_MARKER = ".running"  # {"host", "pid", "slurm_job"} of the job's current attempt
SWEEP_PLAN = "sweep.json"  # the sweep's overrides and every job's, written when it starts
METRICS_FILE = "metrics.json"
NO_METRICS = "no metrics.json: the job process died before writing it (killed? out of memory?)"

Series = dict[str, dict[int, float]]  # tag -> {optimizer step: value}


# ---------------------------------------------------------------- writing


def write_metrics(output_dir: Path, metrics: dict[str, Any]) -> Path:
    """Write `<output_dir>/metrics.json` atomically (a temporary file beside it, then rename;
    never a half-written or left-over temporary file, also on a full disk)."""
    from normlab.run.atomic import atomic_write_bytes

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(finite_or_null(metrics), indent=2, default=float) + "\n"
    return atomic_write_bytes(output_dir / METRICS_FILE, text.encode())


def finite_or_null(value: Any) -> Any:
    """NaN/inf -> null: strict JSON readers reject bare NaN (a diverged loss has one)."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_null(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------- reading jobs


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job dirs of a sweep (those Hydra set up, or that wrote metrics.json), in job order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return []
    found = [
        d
        for d in sweep_dir.iterdir()
        if d.is_dir() and ((d / METRICS_FILE).is_file() or (d / ".hydra").is_dir())
    ]
    return sorted(found, key=lambda d: _job_key(d.name))


def run_dirs(paths: Iterable[Path | str]) -> list[Path]:
    """Each path is a run dir, or a sweep dir whose job dirs are returned."""
    found: list[Path] = []
    for path in map(Path, paths):
        found.extend(job_dirs(path) or [path])
    return found


def read_job(job_dir: Path) -> dict[str, Any]:
    """A job's metrics.json, `running` while an attempt of it runs (its process or SLURM job is
    alive), or a `failed` record when the job never wrote a readable one."""
    path = Path(job_dir) / METRICS_FILE
    running = running_attempt(Path(job_dir))
    if running is not None and (not path.is_file() or running > path.stat().st_mtime):
        return {"status": "running", "overrides": read_overrides(job_dir)}
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as error:
            reason = f"{path}: unreadable ({type(error).__name__}: {error})"
            return {"status": "failed", "error": reason, "overrides": read_overrides(job_dir)}
    return {"status": "failed", "error": NO_METRICS, "overrides": read_overrides(job_dir)}


def collect_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """`metrics.json` of every job under `sweep_dir`, with its job dir name under `job`; the
    sweep's jobs that have no dir yet (`sweep.json`) as `not started`."""
    rows = [{"job": d.name, **read_job(d)} for d in job_dirs(sweep_dir)]
    seen = {row["job"] for row in rows}
    for number, overrides in enumerate(planned_jobs(sweep_dir)):
        if str(number) not in seen:
            rows.append({"job": str(number), "status": "not started", "overrides": overrides})
    return sorted(rows, key=lambda row: _job_key(row["job"]))


def planned_jobs(sweep_dir: Path) -> list[list[str]]:
    """Every job's overrides, as the sweep planned them when it started (`sweep.json`), or []."""
    try:
        plan = json.loads((Path(sweep_dir) / SWEEP_PLAN).read_text())
        return [list(map(str, job)) for job in plan.get("jobs") or []]
    except (OSError, ValueError, AttributeError, TypeError):
        return []


def running_attempt(job_dir: Path) -> float | None:
    """When the job's current attempt started (its `.running` marker's mtime), if that attempt
    still runs: its process is alive on this host, or its SLURM job is still queued/running."""
    marker = Path(job_dir) / RUNNING_MARKER
    try:
        info = json.loads(marker.read_text())
        started = marker.stat().st_mtime
    except (OSError, ValueError):
        return None
    import os
    import socket
    import subprocess

    if info.get("slurm_job"):
        try:
            squeue = subprocess.run(["squeue", "-h", "-o", "%T", "-j", str(info["slurm_job"])],
                                    capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        states = squeue.stdout.split()
        alive = squeue.returncode == 0 and any(s not in ("COMPLETED", "FAILED", "CANCELLED",
                                                         "TIMEOUT") for s in states)
        return started if alive else None
    if info.get("host") != socket.gethostname():
        return None
    try:
        pid = int(info["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None if _ended(pid) else started


def _ended(pid: int) -> bool:
    """A process that has ended but was not reaped yet (a zombie) still answers kill(pid, 0)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")


def read_overrides(job_dir: Path) -> list[str]:
    """The job's task overrides as Hydra saved them (`.hydra/overrides.yaml`), or []."""
    path = Path(job_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.to_container(OmegaConf.load(path)) or []]


def read_config(job_dir: Path) -> Any:
    """Hydra's composed config of the job (`.hydra/config.yaml`), or None."""
    path = Path(job_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.load(path)


def read_choices(job_dir: Path) -> dict[str, str]:
    """The config group choices of the job (`norm: bn`, ...) as Hydra saved them, or {}."""
    path = Path(job_dir) / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    choices = OmegaConf.select(OmegaConf.load(path), "hydra.runtime.choices", default={})
    return {str(k): str(v) for k, v in choices.items() if v is not None}


def _job_key(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (sys.maxsize, name)


# ---------------------------------------------------------------- overrides


def task_overrides() -> list[str]:
    """The command-line overrides of the running Hydra job (what makes it differ), or []."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def is_multirun() -> bool:
    """Is this job part of a Hydra sweep (`-m`)?"""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def override_key(override: str) -> str:
    """`+norm.eps=1e-3` -> `norm.eps`."""
    return override.split("=", 1)[0].lstrip("+~")


def parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """`["norm=bn", "seed=1"]` -> `{"norm": "bn", "seed": "1"}`."""
    return {override_key(o): o.split("=", 1)[1] if "=" in o else "" for o in overrides}


# ---------------------------------------------------------------- event files


def read_scalars(directory: Path | str, prefix: str = "") -> Series:
    """Every scalar whose tag starts with `prefix` in the event files under `directory`
    (`tag -> {step: value}`, the last value logged at a step wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    use_native_crc32c()
    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # one INFO line per event file
    series: Series = {}
    for folder in sorted({p.parent for p in Path(directory).rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            if tag.startswith(prefix):
                points = series.setdefault(tag, {})
                points.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return series


def mean_curve(curves: Iterable[dict[int, float]]) -> tuple[list[int], list[float]]:
    """Mean over curves (`{step: value}`) at the steps all of them have; empty ones are left out."""
    curves = [c for c in curves if c]
    if not curves:
        return [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return steps, [fmean(c[s] for c in curves) for s in steps]


def loss_band(series: Series) -> dict[int, float]:
    """`{step: loss_max - loss_min}`: the spread of the loss along the gradient at each step
    (`landscape/*` scalars of the loss-landscape probe)."""
    lows, highs = series.get("landscape/loss_min", {}), series.get("landscape/loss_max", {})
    return {s: highs[s] - lows[s] for s in lows if s in highs}


# ---------------------------------------------------------------- layers


def _natural(name: str) -> list[Any]:
    """Natural sort key: `layer2` before `layer10`."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p]


def sorted_layers(names: Iterable[str]) -> list[str]:
    """Layer names in forward order (`layer1`, `layer2`, ..., `layer10`, then `head`)."""
    return sorted(set(names), key=lambda name: (not name.startswith("layer"), _natural(name)))


def layers_with(series: Iterable[str], stat: str, prefix: str = "ics") -> list[str]:
    """Layers that have a `<prefix>/<layer>/<stat>` tag, in forward order."""
    pattern = re.compile(rf"{re.escape(prefix)}/([^/]+)/{re.escape(stat)}")
    return sorted_layers(m.group(1) for tag in series if (m := pattern.fullmatch(tag)))


def last_hidden_layer(layers: Iterable[str]) -> str | None:
    """The deepest `layer<N>` among `layers` (the BN paper's Fig. 1 layer), or None."""
    hidden = [name for name in layers if re.fullmatch(r"layer\d+", name)]
    return sorted_layers(hidden)[-1] if hidden else None


# ---------------------------------------------------------------- tables


def markdown(rows: list[dict[str, Any]], columns: Iterable[str], floatfmt: str = ".4f") -> str:
    """A markdown table of `rows` (pandas + tabulate); `|` inside cells is escaped."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(columns)).fillna("")
    frame = frame.map(lambda v: v.replace("|", "/") if isinstance(v, str) else v)
    return frame.to_markdown(index=False, floatfmt=floatfmt) + "\n"
