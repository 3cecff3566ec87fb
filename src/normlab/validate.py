"""Config checks that run before any work: one clear line per mistake, naming key, value, and
what is valid.

Two layers: `check_group_choices` reads the command line before Hydra does (Hydra's own message
for `norm=foo` is a page long); `validate` checks the composed values of one run.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

BATCH_NORMS = ("bn", "custom_bn")


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line meant for the user."""


def one_line(error: BaseException) -> str:
    """The error as one line for the user: a ConfigError as it is, others with their type."""
    # Hydra wraps errors raised while instantiating (e.g. a bad model option): report the cause.
    while type(error).__name__ == "InstantiationException" and error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split())
    if isinstance(error, ConfigError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def group_choices(config_dir: Path, group: str) -> list[str]:
    """The choices of a config group; `_name.yaml` files are shared bases, not choices."""
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml") if not p.stem.startswith("_"))


def check_group_choices(args: Iterable[str], config_dir: Path) -> None:
    """`norm=foo` or `-m norm=none,foo` -> ConfigError listing the choices of `norm`."""
    for arg in args:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or key.startswith(("-", "hydra")) or not (config_dir / key).is_dir():
            continue
        if "(" in value or value in ("null", ""):  # sweep functions (range, glob...) left to Hydra
            continue
        valid = group_choices(config_dir, key)
        for choice in value.split(","):
            if choice not in valid:
                raise ConfigError(
                    f"{key}={choice!r} is not valid; choose one of: {', '.join(valid)}"
                )


def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key)


def _number(cfg: DictConfig, key: str) -> Any:
    value = _select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}={value!r} must be a number")
    return value


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value of `cfg` that cannot work."""
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
        check_checkpoint(Path(cfg.ckpt_path))


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
    if str(_select(cfg, "model._target_")).endswith(".VGG"):
        _validate_vgg(cfg)


def _validate_vgg(cfg: DictConfig) -> None:
    """model=vgg: a known preset, or a layout of channel counts and 'M', that fits the images."""
    from normlab.data.registry import dataset_info
    from normlab.models.vgg import check_layout, resolve_layout

    config = _select(cfg, "model.config")
    config = OmegaConf.to_container(config) if config is not None else None
    data = _select(cfg, "data.name")
    try:
        name, layout = resolve_layout(_select(cfg, "model.preset"), config)
        check_layout(name, layout, dataset_info(data).input_shape)
    except ValueError as error:
        raise ConfigError(f"{error} (data={data})") from None


def _validate_trainer(cfg: DictConfig) -> None:
    accelerator = _select(cfg, "trainer.accelerator")
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={accelerator}: no CUDA GPU is visible on this machine "
                f"(torch.cuda.is_available() is False); use trainer=cpu or trainer=ddp_cpu"
            )


def check_checkpoint(path: Path) -> None:
    """A checkpoint we resume from must exist and unpickle with `weights_only=True`."""
    import torch

    if not path.is_file():
        raise ConfigError(f"ckpt_path={path}: no such file")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = " ".join(str(error).split())[:200]
        raise ConfigError(
            f"ckpt_path={path}: not a loadable checkpoint (truncated or corrupt?): {reason}"
        ) from error
