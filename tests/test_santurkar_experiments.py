"""The santurkar_* experiments state the paper's setup (appendix A), and the CPU one runs."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from hydra import compose, initialize_config_dir

from normlab.config import CONFIG_DIR

needs_sgd = pytest.mark.skipif(
    not (CONFIG_DIR / "optimizer" / "sgd.yaml").exists(),
    reason="needs the optimizer config group (branch arch-opt)",
)


def experiment(name: str, *overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}", *overrides],
                       return_hydra_config=True)


def assert_paper_recipe(cfg) -> None:
    assert cfg.model._target_.endswith(".VGG")
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.momentum == 0.0
    assert cfg.lr == 0.1 and cfg.data.batch_size == 128
    assert cfg.init._target_ == "torch.nn.init.xavier_normal_" and cfg.dropout == 0.0


@needs_sgd
def test_santurkar_vgg_is_the_papers_setup():
    cfg = experiment("santurkar_vgg")
    assert_paper_recipe(cfg)
    assert cfg.data.name == "cifar10" and cfg.model.preset == "vgg11"
    assert cfg.trainer.max_steps == 15000 and cfg.trainer.accelerator == "gpu"
    assert cfg.callbacks.landscape.num_points == 8 and cfg.callbacks.grad_shift is not None
    assert cfg.hydra.sweeper.params == {"norm": "none,bn"}


@needs_sgd
def test_santurkar_cpu_experiments_scale_the_same_recipe():
    small = experiment("santurkar_vgg_small")
    assert_paper_recipe(small)
    assert small.data.name == "digits" and small.model.preset == "vgg_small"
    landscape = experiment("santurkar_landscape")
    assert_paper_recipe(landscape)
    assert landscape.callbacks.landscape.every_n_steps == 10
    assert landscape.callbacks.grad_shift is not None  # callbacks=[landscape, ics] keeps both
    assert landscape.hydra.sweeper.params == {"norm": "none,bn", "lr": "0.1,0.5"}
    noisy = experiment("santurkar_noisy_bn")
    assert_paper_recipe(noisy)
    assert noisy.hydra.sweeper.params == {"norm": "none,bn,noisy_bn"}


@needs_sgd
@pytest.mark.slow
def test_santurkar_landscape_bn_has_the_more_predictive_gradient(tmp_path):
    proc = run_cli(
        "-m", "experiment=santurkar_landscape", "hydra.sweeper.params.lr=0.5",
        "trainer.max_steps=200", f"hydra.sweep.dir={tmp_path}", timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = {}
    for path in tmp_path.glob("*/metrics.json"):
        metrics = json.loads(path.read_text())
        norm = next(o.split("=")[1] for o in metrics["overrides"] if o.startswith("norm="))
        found[norm] = metrics["ics"]["landscape"]
    assert found["bn"]["measurements"] == 20
    assert found["bn"]["grad_pred_max_mean"] < found["none"]["grad_pred_max_mean"]
    assert found["bn"]["loss_band_mean"] < found["none"]["loss_band_mean"]
