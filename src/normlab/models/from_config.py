"""From the composed config to a backbone: the one place that builds the swappable parts.

``conf/norm``, ``conf/activation``, ``conf/init`` and ``conf/model`` name a class or function by
``_target_`` (a user's own from their ``--config-dir`` as well as ours); their other keys are its
options. The norm, activation and init are built as factories (Hydra's ``_partial_``, whatever
the yaml says): a norm is called ``Class(num_features, **options)`` once per layer, an activation
``Class(**options)`` once per block, an init ``function(weight, **options)`` on each Linear/Conv
weight. Keys of the lab inside those groups (``norm.position``) are read here, never passed on.

The backbone gets what its constructor accepts of ``input_shape``, ``num_classes``, ``norm``,
``norm_position``, ``activation``, ``init`` and ``dropout``. Any mistake in a component's options
-- an unknown key, a value its constructor refuses -- comes out as a `ConfigError` naming the
key (``norm.groups=7 does not divide 32 channels; valid: ...``), whoever wrote the class.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from normlab.config.errors import ConfigError

# Keys of a component group that the lab reads itself: never passed to the component.
LAB_KEYS: dict[str, tuple[str, ...]] = {"norm": ("position",)}
# What train() hands a backbone, besides its own options from conf/model.
BACKBONE_PARTS = ("norm", "norm_position", "activation", "init", "dropout")
# Constructor arguments that are not options a config sets.
NOT_OPTIONS = ("self", "num_classes", "device", "dtype", *BACKBONE_PARTS)


def build_backbone(cfg: DictConfig, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The configured backbone for inputs of `input_shape` and `num_classes` classes."""
    parts = {
        "norm": component(cfg, "norm"),
        "norm_position": OmegaConf.select(cfg, "norm.position", default="pre"),
        "activation": component(cfg, "activation"),
        "init": component(cfg, "init"),
        "dropout": cfg.get("dropout", 0.0),
        "input_shape": tuple(input_shape),
        "num_classes": num_classes,
    }
    model = _instantiate(cfg, "model", partial=True)
    return Checked("model", model)(**_accepted(model.func, parts))


def component(cfg: DictConfig, group: str) -> Callable[..., Any] | None:
    """The factory of group `group` (`norm`, `activation`, `init`); None when it is null."""
    if OmegaConf.select(cfg, group) is None:
        return None
    return Checked(group, _instantiate(cfg, group, partial=True))


def _instantiate(cfg: DictConfig, group: str, partial: bool) -> Any:
    from hydra.utils import instantiate

    node = OmegaConf.select(cfg, group)
    if OmegaConf.select(node, "_target_") is None:
        raise ConfigError(f"{group} has no _target_: name the class or function that builds it")
    lab_keys = LAB_KEYS.get(group, ())
    options = {k: v for k, v in node.items() if k not in lab_keys and k != "_partial_"}
    try:
        return instantiate(
            OmegaConf.create(options, parent=cfg), _partial_=partial, _convert_="all"
        )
    except Exception as error:
        cause = error.__cause__ if error.__cause__ is not None else error
        text = " ".join(str(cause).split())
        raise ConfigError(f"{group}._target_={node._target_}: {text}") from error


def _accepted(target: Callable[..., Any], parts: dict[str, Any]) -> dict[str, Any]:
    """The entries of `parts` that `target` takes (all of them if it takes **kwargs)."""
    parameters = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return parts
    return {k: v for k, v in parts.items() if k in parameters}


class Checked:
    """A component factory whose option errors come out as one line naming `<group>.<key>`."""

    def __init__(self, group: str, factory: Callable[..., Any]) -> None:
        self.group, self.factory = group, factory
        self.target = getattr(factory, "func", factory)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.factory(*args, **kwargs)
        except ConfigError:
            raise  # a part built inside this one (a norm inside the model) already said it
        except (TypeError, ValueError) as error:
            raise ConfigError(self.explain(error)) from error

    def __repr__(self) -> str:
        return f"Checked({self.group}, {self.factory!r})"

    def explain(self, error: Exception) -> str:
        """The error as one line for the user, naming the option when it is one."""
        text = " ".join(str(error).split())
        options = getattr(self.factory, "keywords", {})
        unknown = re.search(r"unexpected keyword argument '(\w+)'", text)
        if isinstance(error, TypeError) and unknown:
            return (
                f"{self.group}.{unknown.group(1)} is not an option of {_name(self.target)}; "
                f"valid: {', '.join(option_names(self.target)) or 'none'}"
            )
        if re.match(r"[a-z_]+(\.[a-z_]+)+=", text):  # it names its config key already
            return text
        for key in options:
            if text.startswith(f"{key}="):
                return f"{self.group}.{text}"
        return f"{self.group} ({_name(self.target)}): {text}"


def option_names(target: Callable[..., Any]) -> list[str]:
    """The keyword options of a class or function, following **kwargs up a class's bases."""
    names: list[str] = []
    functions = [c.__init__ for c in inspect.getmro(target)] if inspect.isclass(target) else [
        target
    ]
    for function in functions:
        try:
            parameters = list(inspect.signature(function).parameters.values())
        except (TypeError, ValueError):
            continue
        positional = [p for p in parameters if p.name != "self"][:1]  # the tensor / num_features
        for p in parameters:
            kinds = (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            given = p.name in NOT_OPTIONS or p in positional or p.name in names
            if p.kind in kinds and not given:
                names.append(p.name)
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


def _name(target: Any) -> str:
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}"


def check_components(cfg: DictConfig, batch: int, global_batch: int) -> None:
    """Build the backbone for the configured data and train it on one batch of zeros of the
    per-process `batch` size: every option the components refuse, at build or in a training
    forward pass (a ghost batch that does not divide the batch, an image-only norm on an MLP),
    is a ConfigError before any work. Random number generators are left as they were."""
    import torch

    from normlab.data.registry import DATASETS
    from normlab.nn.traits import batch_dependent

    info = DATASETS.get(OmegaConf.select(cfg, "data.name"))
    if info is None:  # a user's own data module: its shape is known once it has loaded
        return
    with torch.random.fork_rng():
        try:
            model = build_backbone(cfg, info.input_shape, info.num_classes)
        except ConfigError as error:
            if not str(error).startswith("model"):
                raise
            raise ConfigError(f"{error} (data={cfg.data.name})") from error  # sized by the data
        norms = model.norm_layers() if hasattr(model, "norm_layers") else {}
        dependent = [type(n).__name__ for n in norms.values() if batch_dependent(n)]
        if dependent and batch < 2:
            raise ConfigError(
                f"data.batch_size={global_batch}: {dependent[0]} normalizes with the statistics "
                f"of the batch and needs at least 2 samples per batch (per process) in training; "
                f"use a larger data.batch_size or a batch-independent norm "
                f"({', '.join(batch_independent_norms())})"
            )
        norm = component(cfg, "norm")
        try:
            with torch.no_grad():
                model.train()(torch.zeros(batch, *info.input_shape))
        except (TypeError, ValueError, RuntimeError) as error:
            raise ConfigError(norm.explain(error) if norm else str(error)) from error


def batch_independent_norms() -> list[str]:
    """The choices of conf/norm whose class normalizes each sample on its own."""
    from hydra.utils import get_object

    from normlab.config import CONFIG_DIR
    from normlab.nn.traits import batch_dependent

    names = []
    for path in sorted((CONFIG_DIR / "norm").glob("[!_]*.yaml")):
        target = OmegaConf.load(path).get("_target_")
        if target is not None and not batch_dependent(get_object(target)):
            names.append(path.stem)
    return names
