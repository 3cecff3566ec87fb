"""Config checks that run before any work: one clear line per mistake, naming key, value, and
what is valid.

`validate` checks the composed values of one run; `normlab.config.preflight` calls it on the command
line's config before Hydra starts, and `normlab.train.train` again for each job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from normlab.config.errors import ConfigError


def group_choices(config_dir: Path, group: str) -> list[str]:
    """The choices of a config group; `_name.yaml` files are shared bases, not choices."""
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml") if not p.stem.startswith("_"))


def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key)


def _number(cfg: DictConfig, key: str) -> Any:
    value = _select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}={value!r} must be a number")
    return value


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value of `cfg` that cannot work."""
    _validate_seed(cfg)
    dropout = _number(cfg, "dropout")
    if not 0 <= dropout < 1:
        raise ConfigError(f"dropout={dropout} is out of range: it must be in [0, 1)")
    lr = _number(cfg, "lr")
    if lr <= 0:
        raise ConfigError(f"lr={lr} is out of range: it must be > 0")
    grad_clip = _select(cfg, "grad_clip")
    if grad_clip is not None and _number(cfg, "grad_clip") <= 0:
        raise ConfigError(f"grad_clip={grad_clip} is out of range: it must be > 0 (or null: off)")
    _validate_model(cfg)
    _validate_batch(cfg)
    _validate_optimizer(cfg)
    _validate_scheduler(cfg)
    _validate_trainer(cfg)
    _validate_manual_optimization(cfg)
    if cfg.get("ckpt_path"):
        from normlab.run.resume import check_resume

        check_resume(cfg, check_checkpoint(Path(cfg.ckpt_path)))


def _validate_seed(cfg: DictConfig) -> None:
    seed = _select(cfg, "seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed={seed!r} is out of range: it must be an integer in [0, 2**32)")


def _validate_batch(cfg: DictConfig) -> None:
    batch = _number(cfg, "data.batch_size")
    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"data.batch_size={batch} is out of range: it must be an integer >= 1")
    devices = _select(cfg, "trainer.devices")
    per_process = batch // devices if isinstance(devices, int) and devices > 1 else batch
    _validate_components(cfg, batch, per_process)


def _validate_components(cfg: DictConfig, global_batch: int, batch: int) -> None:
    """What the norm, activation, init and model refuse, asked of them (see `check_components`)."""
    from normlab.models.from_config import check_components

    check_components(cfg, batch, global_batch)


def _validate_model(cfg: DictConfig) -> None:
    for key in ("model.hidden_sizes", "model.channels"):
        sizes = _select(cfg, key)
        if sizes is not None and len(sizes) == 0:
            raise ConfigError(f"{key}=[] is empty: give at least one size, e.g. {key}=[32,32]")
        if sizes is not None and any(not isinstance(s, int) or s < 1 for s in sizes):
            raise ConfigError(f"{key}={list(sizes)} must be positive integers")


def steps_per_batch(cfg: DictConfig) -> int:
    """Optimizer steps per Lightning batch (`data.steps_per_call` is its deprecated name)."""
    old = _select(cfg, "data.steps_per_call") is not None
    key = "data.steps_per_call" if old else "data.steps_per_batch"
    value = _integer(cfg, key, minimum=1)
    return 1 if value is None else value


def _integer(cfg: DictConfig, key: str, minimum: int, unit: str = "") -> int | None:
    """`key` when set must be an integer >= minimum; None when unset."""
    value = _select(cfg, key)
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or value < minimum
    ):
        raise ConfigError(
            f"{key}={value!r} is out of range: it must be an integer >= {minimum}{unit}"
        )
    return value


def _in_range(cfg: DictConfig, key: str, low: float, high: float | None, valid: str) -> None:
    """`key` when set must be a number with low <= value < high (`valid` says it in words)."""
    if _select(cfg, key) is None:
        return
    value = _number(cfg, key)
    if value < low or (high is not None and value >= high):
        raise ConfigError(f"{key}={value} is out of range: it must be {valid}")


def _validate_optimizer(cfg: DictConfig) -> None:
    _in_range(cfg, "optimizer.momentum", 0, 1, "in [0, 1)")
    _in_range(cfg, "optimizer.dampening", 0, 1, "in [0, 1)")
    _in_range(cfg, "optimizer.weight_decay", 0, None, ">= 0")
    for i, beta in enumerate(_select(cfg, "optimizer.betas") or []):
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < 1:
            raise ConfigError(
                f"optimizer.betas[{i}]={beta!r} is out of range: it must be in [0, 1)"
            )
    if _select(cfg, "optimizer.nesterov") and not (_select(cfg, "optimizer.momentum") or 0) > 0:
        raise ConfigError(
            "optimizer.nesterov=true needs momentum: set optimizer.momentum > 0, e.g. 0.9"
        )
    fused = _select(cfg, "optimizer.fused")
    if fused is not None and not isinstance(fused, bool):
        raise ConfigError(f"optimizer.fused={fused!r} must be true, false or null (automatic)")


def _validate_scheduler(cfg: DictConfig) -> None:
    for key in ("scheduler.T_max", "scheduler.total_steps", "scheduler.step_size"):
        _integer(cfg, key, minimum=1, unit=" (optimizer steps)")
    _integer(cfg, "scheduler.warmup_steps", minimum=0, unit=" (optimizer steps)")
    gamma = _select(cfg, "scheduler.gamma")
    if gamma is not None and not _number(cfg, "scheduler.gamma") > 0:
        raise ConfigError(f"scheduler.gamma={gamma} is out of range: it must be > 0")
    _in_range(cfg, "scheduler.eta_min", 0, None, ">= 0")
    start = _select(cfg, "scheduler.start_factor")
    if start is not None and not 0 < _number(cfg, "scheduler.start_factor") <= 1:
        raise ConfigError(f"scheduler.start_factor={start} is out of range: it must be in (0, 1]")


# Trainer options Lightning refuses or reinterprets under manual optimization: what to use instead.
MANUAL_OPTIMIZATION = "normlab optimizes manually (several optimizer steps per Lightning batch)"


def _validate_manual_optimization(cfg: DictConfig) -> None:
    clip = _select(cfg, "trainer.gradient_clip_val")
    if clip is not None:
        raise ConfigError(
            f"trainer.gradient_clip_val={clip}: {MANUAL_OPTIMIZATION} and Lightning's clipping "
            f"does not apply; use grad_clip={clip}"
        )
    algorithm = _select(cfg, "trainer.gradient_clip_algorithm")
    if algorithm is not None:
        raise ConfigError(
            f"trainer.gradient_clip_algorithm={algorithm}: {MANUAL_OPTIMIZATION}; grad_clip=<max "
            f"norm> clips the total gradient norm"
        )
    accumulate = _select(cfg, "trainer.accumulate_grad_batches")
    if accumulate not in (None, 1):
        raise ConfigError(
            f"trainer.accumulate_grad_batches={accumulate}: {MANUAL_OPTIMIZATION} and Lightning "
            f"does not accumulate; use a larger data.batch_size"
        )
    log_every = _select(cfg, "trainer.log_every_n_steps")
    if log_every is not None and (not isinstance(log_every, int) or log_every < 1):
        raise ConfigError(
            f"trainer.log_every_n_steps={log_every!r} is out of range: it must be an integer >= 1 "
            f"(optimizer steps between train/lr points)"
        )
    per_batch = steps_per_batch(cfg)
    if per_batch == 1:
        return
    for key, instead in (
        ("limit_train_batches", "trainer.max_steps=<optimizer steps>"),
        ("val_check_interval", "validation at epoch ends (trainer.check_val_every_n_epoch)"),
    ):
        value = _select(cfg, f"trainer.{key}")
        if value is not None and value != 1.0:
            raise ConfigError(
                f"trainer.{key}={value} counts Lightning batches, each of data.steps_per_batch="
                f"{per_batch} optimizer steps; use {instead}, or data.steps_per_batch=1 with it"
            )


def _validate_trainer(cfg: DictConfig) -> None:
    accelerator = _select(cfg, "trainer.accelerator")
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={accelerator}: no CUDA GPU is visible on this machine "
                f"(torch.cuda.is_available() is False); use trainer=cpu or trainer=ddp_cpu"
            )


def check_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint we resume from must exist and unpickle with `weights_only=True`; return it."""
    import torch

    if not path.is_file():
        raise ConfigError(f"ckpt_path={path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(
            f"ckpt_path={path}: not a loadable checkpoint (truncated, corrupt, or not written by "
            f"Lightning): {_load_reason(error)}"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"ckpt_path={path}: not a Lightning checkpoint (no state_dict in it)")
    return checkpoint


def _load_reason(error: Exception) -> str:
    """torch's first line only: the rest of its message suggests `weights_only=False`, which would
    let the file run arbitrary code."""
    text = " ".join(str(error).split())
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation")[0]
        return f"cannot unpickle it: {text.strip()}"[:160]
    return (text.split(". ")[0] or type(error).__name__)[:160]
