"""Config checks that run before any work: one clear line per mistake, naming key, value, and
what is valid.

`validate` checks the composed values of one run; `normlab.preflight` calls it on the command
line's config before Hydra starts, and `normlab.train.train` again for each job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

BATCH_NORMS = ("bn", "custom_bn")


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line meant for the user."""


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
    _validate_batch(cfg)
    _validate_model(cfg)
    _validate_trainer(cfg)
    if cfg.get("ckpt_path"):
        from normlab.resume import check_resume

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
    norm = _select(cfg, "norm.name")
    if norm in BATCH_NORMS and per_process < 2:
        raise ConfigError(
            f"data.batch_size={batch} with norm={norm}: batch norm needs at least 2 samples per "
            f"batch (per process) in training; use a larger data.batch_size or norm=none"
        )


def _validate_model(cfg: DictConfig) -> None:
    for key in ("model.hidden_sizes", "model.channels"):
        sizes = _select(cfg, key)
        if sizes is not None and len(sizes) == 0:
            raise ConfigError(f"{key}=[] is empty: give at least one size, e.g. {key}=[32,32]")
        if sizes is not None and any(not isinstance(s, int) or s < 1 for s in sizes):
            raise ConfigError(f"{key}={list(sizes)} must be positive integers")


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
