"""The open lab: every norm of conf/norm/ keeps the protocol the instruments rely on, and a
researcher's own norm, activation, init and backbone -- in their own folder, outside the
repository -- run exactly as the README's recipe says."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, choices, compose_cfg, part
from omegaconf import open_dict
from torch import nn

from normlab.config.validate import ConfigError, validate
from normlab.nn import batch_dependent, fold_batchnorm, has_running_stats

SHAPES = [(8, 6), (8, 6, 4, 4)]


def training_outputs(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)  # noisy BN draws noise: the same draws for both batches
    return norm.train()(x)


@pytest.mark.parametrize("name", choices("norm"))
def test_declared_batch_dependence_is_what_the_norm_does(name):
    """Change the other samples of the batch: does sample 0's training output change?"""
    norm = part("norm", name, **({"ghost_batch_size": 4} if name == "ghost_bn" else {}))(6)
    measured = set()
    for shape in SHAPES:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(shape, generator=g) * 2 + 1
        other = x.clone()
        other[1:] = torch.randn(other[1:].shape, generator=g) * 3 - 2
        first, second = training_outputs(norm, x)[0], training_outputs(norm, other)[0]
        measured.add(not torch.allclose(first, second, atol=1e-6))
    assert measured == {batch_dependent(norm)}, name


@pytest.mark.parametrize("name", choices("norm"))
def test_every_norm_takes_features_and_images(name):
    for shape in SHAPES:
        norm = part("norm", name)(6)
        x = torch.randn(32, *shape[1:])
        for training in (True, False):
            assert norm.train(training)(x).shape == x.shape


@pytest.mark.parametrize("name", choices("norm"))
def test_fold_folds_running_statistics_and_warns_for_the_rest(name):
    from normlab.models.backbones import MLP

    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, norm=part("norm", name))
    model.train()(torch.randn(32, 1, 8, 8) * 2 + 1)  # non-trivial running statistics
    report: list[str] = []
    with pytest.warns() if model.norm_layers() and not has_running_stats(
        model.blocks.layer1.norm
    ) else _no_warning():
        folded = fold_batchnorm(model, report)
    assert len(report) == len(model.norm_layers())
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    left = [line for line in report if "left in place" in line]
    cannot_fold = bool(model.norm_layers()) and not has_running_stats(model.blocks.layer1.norm)
    assert bool(left) == cannot_fold


class _no_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


# ---- a user's own norm, by _target_ ---------------------------------------------------------


class UserNorm(nn.Module):
    """A user's norm without any declaration: the lab must assume it is batch-dependent."""

    def __init__(self, num_features: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(tuple(range(1, x.dim())), keepdim=True) + self.eps)
        return x if self.weight is None else x * self.weight.view(1, -1, *[1] * (x.dim() - 2))


def user_norm_cfg(tmp_path, **options):
    cfg = compose_cfg(tmp_path)
    with open_dict(cfg):
        cfg.norm = {"_target_": f"{__name__}.UserNorm", "position": "pre", **options}
    return cfg


def test_a_user_norm_with_a_bad_option_is_one_line_naming_it(tmp_path):
    with pytest.raises(ConfigError) as error:
        validate(user_norm_cfg(tmp_path, bogus=1))
    assert str(error.value) == (
        f"norm.bogus is not an option of {__name__}.UserNorm; valid: eps, affine"
    )


def test_an_undeclared_user_norm_is_assumed_batch_dependent(tmp_path):
    validate(user_norm_cfg(tmp_path, eps=1e-3))
    cfg = user_norm_cfg(tmp_path)
    with open_dict(cfg):
        cfg.data.batch_size = 1
    with pytest.raises(ConfigError, match=r"data.batch_size=1: UserNorm normalizes with the stat"):
        validate(cfg)


def test_option_checks_in_a_constructor_reach_the_user_as_one_line(make_cfg):
    with pytest.raises(ConfigError) as error:
        validate(make_cfg("norm=batch_renorm", "norm.r_max=0.5"))
    assert str(error.value).startswith("norm.r_max=0.5 is out of range: batch renorm needs r_max")


# ---- the README's recipe, followed to the letter ---------------------------------------------


def readme_recipe() -> tuple[dict[str, str], list[str]]:
    """The files (by the path in their first line) and the commands of the README's
    "Add your own normalization" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Add your own normalization", 1)[1].split("\n## ", 1)[0]
    files, commands = {}, []
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, re.S):
        if lang == "bash":
            commands += [line for line in body.splitlines() if "train.py" in line]
        else:
            first, rest = body.split("\n", 1)
            files[first.lstrip("# ").strip()] = body if lang == "python" else rest
    return files, commands


def test_readme_recipe_is_short():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Add your own normalization", 1)[1].split("**Your own backbone**")[0]
    code = [line for block in re.findall(r"```\w+\n(.*?)```", section, re.S)
            for line in block.splitlines()]
    assert len(code) <= 22


@pytest.mark.slow  # a subprocess sweep or import-heavy CLI run: CI runs it with -m slow
def test_readme_recipe_runs_from_a_folder_outside_the_repository(tmp_path):
    files, commands = readme_recipe()
    assert set(files) == {"mynorms.py", "my_conf/norm/msn.yaml", "mynets.py",
                          "my_conf/model/wide.yaml"}
    for path, body in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(body)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": "."}
    env.pop("HYDRA_FULL_ERROR", None)
    sweep, single = commands
    for i, command in enumerate((sweep, single)):
        args = command.split("python train.py", 1)[1].split()
        if "-m" in args:  # the recipe's sweep, one epoch: MLP and CNN, pre and post
            args += [f"hydra.sweep.dir={tmp_path / 'sweep'}"]
        else:
            args += [f"hydra.run.dir={tmp_path / 'single'}"]
        proc = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *args, "trainer.max_epochs=1",
             "data.steps_per_batch=8"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, (i, proc.stderr[-2000:])
    jobs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    records = [json.loads(p.read_text()) for p in jobs]
    assert len(records) == 8 and all(r["status"] == "ok" for r in records)
    user = [r for r in records if r["hparams"]["norm"] == "msn"]
    assert len(user) == 4 and all(r["ics"] and r["val/acc"] > 0.3 for r in user)
    assert {r["hparams"]["position"] for r in user} == {"pre", "post"}
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert single["status"] == "ok" and single["hparams"]["model"] == "wide"
    assert "normlab" not in str(tmp_path) and not (ROOT / "mynorms.py").exists()


def test_a_target_that_does_not_import_is_one_line(tmp_path):
    cfg = compose_cfg(tmp_path)
    with open_dict(cfg):
        cfg.norm = {"_target_": "no_such_package.Norm", "position": "pre"}
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    message = str(error.value)
    assert message.startswith("norm._target_=no_such_package.Norm: ") and "\n" not in message
