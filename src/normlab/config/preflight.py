"""The command line checked before Hydra starts: one line per mistake, no job dir created.

`check_command_line(argv)` composes the config exactly as Hydra is about to (same search path,
so `hydra.searchpath=[...]` and `--config-dir` count; once per value of each swept override)
and turns every problem into a `ConfigError` naming the key:

- a group choice that does not exist (`norm=foo`), listing the choices Hydra can see;
- a key that no config declares, on the command line or in a config file (an experiment's
  `learning_rate: 0.5`), with its nearest valid neighbours;
- invalid YAML, as the file and line;
- every value `normlab.config.validate.validate` checks (seed, lr, checkpoint to resume from...);
- an output dir that cannot be created.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from normlab.config import CONFIG_DIR
from normlab.config.validate import ConfigError, validate

# Below these keys a config may hold any keys: lists of instantiated objects, whose entries are
# the objects' own arguments, and Hydra's own settings (checked by Hydra).
OPEN_KEYS = ("callbacks", "logger", "hydra")
# Hydra's own flags that only print (help, config, completion): nothing to check.
PRINT_ONLY = ("help", "hydra_help", "info", "shell_completion", "cfg", "experimental_rerun")


def check_command_line(argv: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """Raise ConfigError for the first problem of `python train.py ARGV`."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    if any(getattr(args, flag, None) for flag in PRINT_ONLY) or args.config_path:
        return
    from hydra.core.global_hydra import GlobalHydra

    hydra = _hydra(config_dir, args.config_dir)
    config_name = args.config_name or "train"
    try:
        for overrides in _expanded(args.overrides):
            cfg = _compose(hydra, config_name, overrides, args.multirun)
            check_known_keys(hydra, config_name, cfg, overrides)
            check_output_dir(cfg, "sweep" if args.multirun else "run")
            _as_a_job(cfg)  # ${hydra:job.num}, ${hydra:sweep.dir} resolve as in job 0
            validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
        if args.multirun:
            check_launcher(cfg)  # the sweep's one launcher: once, not per composed value
    finally:
        from hydra.core.hydra_config import HydraConfig

        GlobalHydra.instance().clear()  # hydra.main sets up its own
        HydraConfig.instance().cfg = None  # the job context of _as_a_job ends with the checks


def check_launcher(cfg: DictConfig) -> None:
    """Build the sweep's launcher from its settings as Hydra will: a bad setting is one line now,
    not a traceback once the sweep starts."""
    import importlib

    from normlab.config.errors import one_line

    settings = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    module, _, name = str(settings.pop("_target_")).rpartition(".")
    try:
        getattr(importlib.import_module(module), name)(**settings)
    except Exception as error:
        raise ConfigError(one_line(error)) from error


def _as_a_job(cfg: Any) -> None:
    """Let `${hydra:...}` interpolations (e.g. `seed='${hydra:job.num}'`) resolve during the
    checks as they will in the first job."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    if "hydra" not in cfg:
        return
    with open_dict(cfg):
        if OmegaConf.is_missing(cfg.hydra.job, "num"):
            cfg.hydra.job.num = 0
        if OmegaConf.is_missing(cfg.hydra.job, "id"):
            cfg.hydra.job.id = "0"
    HydraConfig.instance().set_config(cfg)


def _hydra(config_dir: Path, extra_dir: str | None) -> Any:
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path

    search_path = create_config_search_path(str(config_dir))
    if extra_dir is not None:  # what `--config-dir` does in hydra.main
        folder = os.path.abspath(extra_dir)
        if not os.path.isdir(folder):
            raise ConfigError(f"--config-dir {extra_dir}: no such directory")
        search_path.prepend(provider="command-line", path=f"file://{folder}")
    return Hydra.create_main_hydra2(task_name="train", config_search_path=search_path)


def _expanded(overrides: list[str]) -> Iterator[list[str]]:
    """The overrides with each sweep replaced by one of its values: the k-th value of every
    sweep together (a sweep shorter than k keeps its first), for k up to the longest sweep. So
    every value gets composed and checked, in as few composes as the longest sweep has values
    (3, not 5, for `norm=none,bn activation=relu,sigmoid seed=0,1,2`): each costs ~0.3 s."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as error:
        raise ConfigError(" ".join(str(error).split())) from error
    choices = [values for values in (_values(o) for o in parsed) if values]
    for k in range(max((len(values) for values in choices), default=1)):
        yield [values[k] if k < len(values) else values[0] for values in choices]


def _values(override: Any) -> list[str]:
    """`key=value` lines for each value of an override ([] for sweeps Hydra expands itself)."""
    if not override.is_sweep_override():
        return [override.input_line]
    from hydra.core.override_parser.types import ValueType

    if override.is_discrete_sweep() and override.value_type != ValueType.GLOB_CHOICE_SWEEP:
        key = override.get_key_element()
        return [f"{key}={value}" for value in override.sweep_string_iterator()]
    return []  # glob or interval (optuna): left to Hydra and to each job's own check


def _compose(
    hydra: Any, config_name: str, overrides: list[str], multirun: bool = False
) -> DictConfig:
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from hydra.types import RunMode
    from yaml import MarkedYAMLError

    try:
        mode = RunMode.MULTIRUN if multirun else RunMode.RUN  # launcher/sweeper groups in -m only
        return hydra.compose_config(config_name, overrides, run_mode=mode)
    except MissingConfigException as error:
        raise ConfigError(_missing_message(error, overrides)) from error
    except MarkedYAMLError as error:
        raise ConfigError(_yaml_message(error)) from error
    except ConfigCompositionException as error:
        full_key = getattr(error.__cause__, "full_key", None)
        if full_key and "not in struct" in str(error.__cause__):
            message = _unknown_on_command_line(hydra, config_name, full_key, overrides)
            raise ConfigError(message) from error
        raise ConfigError(" ".join(str(error).split())) from error


def _missing_message(error: Any, overrides: list[str]) -> str:
    first = str(error).splitlines()[0]  # In 'train': Could not find 'norm/foo'
    missing = first.rsplit("Could not find", 1)[-1].strip(" '")
    group, _, choice = missing.rpartition("/")
    if error.options is not None and group:
        options = [o for o in error.options if not o.startswith("_")]  # `_name`: shared bases
        return f"{group}={choice!r} is not valid; choose one of: {', '.join(options)}"
    return " ".join(first.split())


def _yaml_message(error: Any) -> str:
    mark = error.problem_mark or error.context_mark
    where = f"{mark.name} line {mark.line + 1}" if mark is not None else "a config file"
    return f"invalid YAML in {where}: {error.problem or error.context}"


def _unknown_on_command_line(
    hydra: Any, config_name: str, full_key: str, overrides: list[str]
) -> str:
    given = next((o for o in overrides if o.lstrip("~+").split("=")[0] == full_key), full_key)
    others = [o for o in overrides if o != given]
    try:
        reference = _compose(hydra, config_name, others)
    except ConfigError:
        return f"unknown config key {full_key!r} ({given})"
    hint = _neighbours(full_key, reference)
    return (
        f"unknown config key {full_key!r} ({given}){hint}; "
        f"to add a new key on purpose write +{given.lstrip('+')}"
    )


def check_known_keys(hydra: Any, config_name: str, cfg: DictConfig, overrides: list[str]) -> None:
    """Every key of `cfg` must be declared by the configs of its groups without the experiment.

    Hydra's struct mode covers the command line; keys that an experiment (or any `_global_`
    config file) merges in are new keys to Hydra, so `learning_rate: 0.5` would be kept and
    never read. Compose the same group choices without the experiment and compare.
    """
    choices = cfg.hydra.runtime.choices
    experiment = choices.get("experiment")
    if experiment is None:
        return
    groups = [f"{g}={c}" for g, c in choices.items() if _is_task_group(g) and c is not None]
    groups = [g for g in groups if not g.startswith("experiment=")]
    keys = {o: o.split("=")[0].lstrip("~+") for o in overrides if "=" in o}
    values = [o for o, k in keys.items() if not k.startswith("hydra") and k not in choices]
    reference = _compose(hydra, config_name, [*groups, *values])
    added = {o.split("=")[0].lstrip("+") for o in overrides if o.startswith("+")}
    for key in _unknown_keys(cfg, reference):
        if key not in added:
            raise ConfigError(
                f"unknown config key {key!r} (experiment={experiment}){_neighbours(key, reference)}"
            )


def _is_task_group(group: str) -> bool:
    return not group.startswith("hydra") and "/" not in group


def _unknown_keys(cfg: Any, reference: Any, prefix: str = "") -> Iterator[str]:
    if not isinstance(cfg, DictConfig) or not isinstance(reference, DictConfig):
        return
    for key in cfg:
        path = f"{prefix}{key}"
        if path in OPEN_KEYS:
            continue
        if key not in reference:
            yield path
            continue
        ref_value = reference._get_node(key)
        if ref_value is None or ref_value._is_none() or ref_value._is_missing():
            continue  # a null/??? slot may be filled with anything (e.g. grad_shift: {...})
        yield from _unknown_keys(cfg._get_node(key), ref_value, f"{path}.")


def _neighbours(key: str, reference: DictConfig) -> str:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(reference, parent) if parent else reference
    keys = node if isinstance(node, DictConfig) else []
    siblings = [str(k) for k in keys if str(k) not in OPEN_KEYS]
    initials = "".join(word[0] for word in leaf.split("_") if word)  # learning_rate -> lr
    close = [k for k in siblings if len(initials) > 1 and k == initials]
    others = [k for k in siblings if k not in close]
    close += difflib.get_close_matches(leaf, others, n=3, cutoff=0.5)
    named = [f"{parent}.{k}" if parent else k for k in (close or siblings[:12])]
    label = "nearest valid keys" if close else "valid keys here"
    return f"; {label}: {', '.join(named)}" if named else ""


def check_output_dir(cfg: DictConfig, mode: str) -> None:
    """`hydra.run.dir` (or `hydra.sweep.dir`) must be creatable: its nearest existing ancestor is
    a writable directory on a filesystem with room left."""
    import shutil

    key = f"hydra.{mode}.dir"
    try:
        folder = Path(str(OmegaConf.select(cfg, key))).absolute()
    except Exception:  # an interpolation only Hydra's run can resolve: Hydra will report it
        return
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key}={folder}: cannot create it: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={folder}: cannot create it: {existing} is not writable")
    free = shutil.disk_usage(existing).free
    if free < 16 * 1024:
        raise ConfigError(f"{key}={folder}: the filesystem is full ({free} bytes free)")
