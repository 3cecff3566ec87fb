import itertools
import json

import pytest
import torch
from conftest import choices, event_tags, run_cli

from normlab.train import train

# Every activation x init with and without BN; every other norm once per backbone
# (tests/test_norms.py covers each norm against its reference).
LINEAR = ["identity"]  # a deep linear net (rank collapse): once per backbone, not per init
GRID = [
    *itertools.product(["mlp", "cnn"], ["none", "bn"],
                       [a for a in choices("activation") if a not in LINEAR], choices("init")),
    *itertools.product(["mlp", "cnn"], ["bn"], LINEAR, ["default"]),
    *itertools.product(["mlp", "cnn"], [n for n in choices("norm") if n not in ("none", "bn")],
                       ["relu"], ["default"]),
]


@pytest.mark.parametrize(("model", "norm", "activation", "init"), GRID)
def test_every_combination_trains_a_step(make_cfg, model, norm, activation, init):
    from normlab.config.validate import ConfigError, validate

    if model == "mlp":  # an image-only norm (norm=in) refuses the MLP in one line
        try:
            validate(make_cfg(f"norm={norm}"))
        except ConfigError as error:
            assert "use model=cnn" in str(error) and "\n" not in str(error)
            return
    cfg = make_cfg(
        f"model={model}",
        f"norm={norm}",
        f"activation={activation}",
        f"init={init}",
        "dropout=0.2",
        "+trainer.fast_dev_run=true",
        "~logger",
        "~callbacks",
        "data.steps_per_batch=1",
    )
    result = train(cfg)
    assert result["status"] == "ok"
    assert 0.0 <= result["test/acc"] <= 1.0 and result["steps"] == 1


def test_train_writes_metrics_json_and_checkpoint(make_cfg, tmp_path):
    result = train(make_cfg("trainer.max_epochs=2", "seed=1"))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["status"] == "ok" and written["epochs"] == 2 and written["steps"] == 2 * 37
    assert written["val/acc"] > 0.8  # digits is easy: 2 epochs of the 64-32-32-10 MLP
    for key in ("val/loss", "test/acc", "test/loss", "train_seconds", "overrides", "ics"):
        assert key in written
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 74
    tags = event_tags(tmp_path / "tensorboard")
    assert {"preact/layer1", "preact/layer2"} <= tags["histograms"]
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc"} <= tags[
        "scalars"
    ]


def test_same_seed_pairs_runs_across_norms(make_cfg):
    """Same seed: identical Linear weights at start and identical batches whatever the norm."""
    from hydra.utils import instantiate

    def first_weights_and_batches(norm):
        cfg = make_cfg(f"norm={norm}", "seed=5")
        torch.manual_seed(cfg.seed)
        dm = instantiate(cfg.data)
        model = instantiate(cfg.model, input_shape=dm.input_shape, num_classes=10, _convert_="all")
        loader = dm.train_dataloader()
        loader.set_epoch(2)
        return model.blocks.layer1.linear.weight.detach(), [stack.y for stack in loader]

    w_none, b_none = first_weights_and_batches("none")
    w_bn, b_bn = first_weights_and_batches("bn")
    assert torch.equal(w_none, w_bn)
    assert all(torch.equal(a, b) for a, b in zip(b_none, b_bn, strict=True))


def test_failed_run_records_status_and_error(make_cfg, tmp_path):
    with pytest.raises(Exception, match="MNIST files not found"):
        train(make_cfg("data=mnist"))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["status"] == "failed" and "MNIST files not found" in written["error"]


@pytest.mark.slow  # a subprocess sweep or import-heavy CLI run: CI runs it with -m slow
def test_cli_sweep_none_vs_bn(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "norm=none,bn", "trainer.max_epochs=2", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for job, norm in (("0", "none"), ("1", "bn")):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["status"] == "ok" and metrics["overrides"] == [
            f"norm={norm}",
            "trainer.max_epochs=2",
        ]
        assert {"preact/layer1", "preact/layer2"} <= event_tags(sweep / job)["histograms"]
        assert (sweep / job / ".hydra" / "config.yaml").exists()
    summary = (sweep / "summary.md").read_text()
    assert "| 0 | norm=none trainer.max_epochs=2 | ok |" in " ".join(summary.split())
    assert "norm=bn" in summary
    assert "Sweep summary" in proc.stdout


@pytest.mark.slow  # a subprocess sweep or import-heavy CLI run: CI runs it with -m slow
def test_cli_missing_dataset_is_one_clear_line(tmp_path):
    proc = run_cli("data=mnist", f"paths.data_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert (
        "put train-images-idx3-ubyte" in proc.stderr
        and str(tmp_path / "MNIST" / "raw") in proc.stderr
    )


@pytest.mark.slow
def test_ddp_cpu_run_finishes_with_one_job_dir(tmp_path):
    runs = tmp_path / "runs"
    proc = run_cli(
        "trainer=ddp_cpu", "trainer.max_epochs=1", f"hydra.run.dir={runs}/job", timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [p.name for p in runs.iterdir()] == ["job"]
    metrics = json.loads((runs / "job" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["val/acc"] > 0.5
