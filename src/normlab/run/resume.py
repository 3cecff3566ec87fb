"""Honest resume: a checkpoint carries the config it was trained with, and a resume that would
change what the checkpoint means is refused in one line.

- Architecture (`model.*`, `norm.*`, `activation.*`, `dropout`, `data.name`): must match; the
  weights are only meaningful for the network and data they were trained on.
- Optimizer settings (`lr`, `optimizer.*`, `scheduler.*`, `grad_clip`): must match too. Lightning
  restores the optimizer's state, lr included, from the checkpoint, so a new value on the command
  line would be recorded but not used; we refuse rather than report a run that did not happen.
  To train on with other settings, start a fresh run.
- Everything else (`trainer.max_epochs`, `seed`, logging, callbacks...) is taken from the
  command line as usual.
- A checkpoint whose run already reached `trainer.max_epochs` (or `max_steps`): nothing to do.
  `ResumeFinished` says so; the command line exits 0 without creating a run dir.

`normlab.run.checkpoints.StoreConfig` (a Lightning callback) writes the composed config into every
checkpoint as plain containers under `normlab_config`, so `torch.load(..., weights_only=True)`
still reads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from normlab.config.errors import ConfigError

CONFIG_KEY = "normlab_config"
ARCHITECTURE = ("model", "norm", "activation", "dropout", "data.name")
OPTIMIZER = ("lr", "optimizer", "scheduler", "grad_clip")
# model.{norm,activation,init,dropout} are interpolations of the top-level groups; init only
# matters before the first step, so it may differ on resume.
IGNORED = ("model.norm", "model.activation", "model.init", "model.dropout")


class ResumeFinished(ConfigError):
    """The checkpoint's run already trained as far as the config asks: nothing to resume."""


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The keys compared on resume, resolved to plain Python values."""
    plain: dict[str, Any] = {}
    for key in (*ARCHITECTURE, *OPTIMIZER):
        node = OmegaConf.select(cfg, key, default=None)
        is_config = OmegaConf.is_config(node)
        plain[key] = OmegaConf.to_container(node, resolve=True) if is_config else node
    return plain


def check_resume(cfg: DictConfig, checkpoint: dict[str, Any]) -> None:
    """ConfigError if resuming `checkpoint` under `cfg` would train something else than it says."""
    path = Path(cfg.ckpt_path)
    saved = checkpoint.get(CONFIG_KEY)
    if saved is not None:
        current = plain_config(cfg)
        for kind, keys, advice in (
            ("the architecture differs", ARCHITECTURE, "its weights belong to its own network"),
            (
                "the optimizer settings differ",
                OPTIMIZER,
                "the optimizer state (lr included) is restored from the checkpoint",
            ),
        ):
            differing = _differences({k: saved.get(k) for k in keys}, current, keys)
            if differing:
                raise ConfigError(
                    f"ckpt_path={path}: {kind} from the checkpoint's: "
                    f"{'; '.join(differing)} ({advice}); resume with the checkpoint's values, "
                    f"or drop ckpt_path to start a fresh run"
                )
    _check_not_finished(cfg, checkpoint, path)


def _differences(saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...]) -> list:
    lines = []
    for key in keys:
        for name, (was, now) in _flat_diff(key, saved.get(key), current.get(key)).items():
            if not name.startswith(IGNORED):
                lines.append(f"{name}={now!r} (checkpoint: {was!r})")
    return lines


def _flat_diff(prefix: str, was: Any, now: Any) -> dict[str, tuple[Any, Any]]:
    if isinstance(was, dict) and isinstance(now, dict) and was.get("name") != now.get("name"):
        return {prefix: (was.get("name"), now.get("name"))}  # another choice of the group
    if isinstance(was, dict) and isinstance(now, dict):
        found: dict[str, tuple[Any, Any]] = {}
        for key in sorted(set(was) | set(now)):
            found.update(_flat_diff(f"{prefix}.{key}", was.get(key), now.get(key)))
        return found
    return {} if was == now else {prefix: (was, now)}


def _check_not_finished(cfg: DictConfig, checkpoint: dict[str, Any], path: Path) -> None:
    epochs = completed_epochs(checkpoint)
    steps = checkpoint.get("global_step", 0)
    max_epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
    max_steps = OmegaConf.select(cfg, "trainer.max_steps", default=-1)
    if max_epochs is not None and max_epochs >= 0 and epochs >= max_epochs:
        raise ResumeFinished(
            f"ckpt_path={path}: that run already trained {epochs} epoch(s), and "
            f"trainer.max_epochs={max_epochs}: nothing to do (raise trainer.max_epochs to go on)"
        )
    if max_steps is not None and max_steps >= 0 and steps >= max_steps:
        raise ResumeFinished(
            f"ckpt_path={path}: that run already made {steps} optimizer steps, and "
            f"trainer.max_steps={max_steps}: nothing to do (raise trainer.max_steps to go on)"
        )


def completed_epochs(checkpoint: dict[str, Any]) -> int:
    """Epochs whose training part had ended when the checkpoint was written (a mid-epoch
    checkpoint counts only the epochs before it)."""
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return checkpoint.get("epoch", 0) + 1


# ---------------------------------------------------------------- a job continues in its own dir
FINISHED = ("ok", "diverged")

def continue_job(cfg: DictConfig) -> dict[str, Any] | None:
    """A sweep's job run again in its own dir: the recorded result when it had finished (kept,
    not retrained); otherwise None, with `cfg.ckpt_path` set to its own checkpoint if it left
    one (see `own_checkpoint`)."""
    kept = finished_job(cfg)
    if kept is None and (path := own_checkpoint(cfg)) is not None:
        cfg.ckpt_path = str(path)
    if kept is None and _in_sweep():
        _mark_running(Path(cfg.paths.output_dir))
    return kept


def _mark_running(job_dir: Path) -> None:
    """`<job dir>/.running`: which process (or SLURM job) runs this attempt; the summary and the
    report count the job `running` while it is alive (`normlab.results.runs.read_job`)."""
    import json
    import socket

    from normlab.results.runs import RUNNING_MARKER
    from normlab.run.atomic import atomic_write_bytes

    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array else os.environ.get("SLURM_JOB_ID")
    info = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": job}
    job_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(job_dir / RUNNING_MARKER, json.dumps(info).encode())


def trained_something(summary: dict[str, Any]) -> dict[str, Any]:
    """`summary` of a fit that made at least one optimizer step; a run that trained nothing
    (0 steps: e.g. trainer.limit_train_batches=0) is never `ok`: RuntimeError."""
    if summary.get("steps") == 0:
        raise RuntimeError(
            "the run trained 0 optimizer steps (trainer.max_epochs, max_steps or "
            "limit_train_batches leave no training batch): nothing to report"
        )
    return summary


def finished_job(cfg: DictConfig) -> dict[str, Any] | None:
    """In a sweep, the recorded result of a job whose dir already holds a finished run (a sweep
    run again with `hydra.sweep.dir=<its dir>`): it is kept as it is, never retrained."""
    record = _job_record(cfg)
    return record if record is not None and record.get("status") in FINISHED else None


def own_checkpoint(cfg: DictConfig) -> Path | None:
    """In a sweep (or a requeued SLURM job), the job's own `checkpoints/last.ckpt` left by an
    interrupted, killed or preempted attempt, when no `ckpt_path` was given: the job resumes
    from it, in its own dir."""
    if cfg.get("ckpt_path") or not _in_sweep():
        return None
    path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    record = _job_record(cfg)
    if not path.is_file() or (record is not None and record.get("status") in FINISHED):
        return None
    return path


def _in_sweep() -> bool:
    from normlab.results.runs import is_multirun

    return is_multirun() or "SLURM_RESTART_COUNT" in os.environ


def _job_record(cfg: DictConfig) -> dict[str, Any] | None:
    import json

    if not _in_sweep():
        return None
    path = Path(cfg.paths.output_dir) / "metrics.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
