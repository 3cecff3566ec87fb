"""What a newcomer sees in TensorBoard: run names, hparams, the sweep's comparison figure, the
custom-scalars layout. The slow test reads a real TensorBoard server's HTTP API."""

from __future__ import annotations

import time

import pytest
from conftest import compose_cfg, event_tags, get_json, run_cli, tensorboard_server, wait_for_json

from normlab.callbacks.ics import GradShift
from normlab.results.dashboard import hparams_of, ics_layout, run_name


def test_hparams_name_the_choices(tmp_path):
    cfg = compose_cfg(tmp_path, "norm=custom_bn", "activation=tanh", "lr=0.05", "seed=3")
    params = hparams_of(cfg)  # outside a Hydra job the choice names are unknown: class names
    assert params["norm"] == "BatchNorm" and params["activation"] == "Tanh"
    assert params["lr"] == 0.05 and params["seed"] == 3
    assert params["batch_size"] == cfg.data.batch_size


def test_run_name_is_empty_outside_a_hydra_job():
    assert run_name() == ""


def test_layout_lists_layers_in_forward_order_and_only_logged_sections():
    layers = ["layer10", "layer2", "layer1"]
    plain = ics_layout(layers)
    (ics_section, charts), *rest = plain.items()
    assert list(charts) == ["layer1", "layer2", "layer10"]
    assert [title for title, _ in rest] == ["Gradient norms"]
    assert not any("shift" in title for title in plain)
    with_shift = ics_layout(layers, GradShift().layout_section(layers), grads=False)
    shift_charts = with_shift["ICS: gradient shift ||G - G'|| (Santurkar et al. 2018)"]
    assert "layer1 grad_shift" not in shift_charts  # nothing before layer 1 moves
    assert list(shift_charts)[:2] == ["layer2 grad_shift", "layer2 grad_cos"]
    assert "Gradient norms" not in with_shift


@pytest.mark.slow
def test_tensorboard_shows_a_sweep_at_a_glance(tmp_path):
    sweep = tmp_path / "sweep"
    done = run_cli("-m", "norm=none,bn", "trainer.max_epochs=2", f"hydra.sweep.dir={sweep}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"tensorboard --logdir {sweep}" in done.stdout
    assert "preact/layer1" in event_tags(sweep / "0")["histograms"]
    with tensorboard_server(sweep) as base:
        runs = sorted(wait_for_json(f"{base}/runs", lambda answer: len(answer) >= 3))
        time.sleep(2)  # let the plugins finish their first load
        assert runs == ["0/tensorboard/norm=none,trainer.max_epochs=2",
                        "1/tensorboard/norm=bn,trainer.max_epochs=2", "tensorboard/_sweep"]
        experiment = get_json(f"{base}/plugin/hparams/experiment", {"experimentName": ""})
        norm = next(h for h in experiment["hparamInfos"] if h["name"] == "norm")
        assert sorted(norm["domainDiscrete"]) == ["bn", "none"]
        metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
        assert metrics == {"val/acc", "test/acc"}
        images = get_json(f"{base}/plugin/images/tags")
        assert set(images["tensorboard/_sweep"]) == {
        "comparison/ics_bands",
        "comparison/accuracy",
        "comparison/gradient_profile",
        "comparison/rank",
    }
        layout = get_json(f"{base}/plugin/custom_scalars/layout")
        charts = [c["title"] for cat in layout["category"] for c in cat["chart"]]
        # layers in forward order first; no empty grad-shift section; the depth probe's charts
        assert charts[:2] == ["layer1", "layer2"]
        assert sorted(charts[2:]) == sorted(["grads", "gradient norm", "relative gradient norm",
                                             "block output std", "stable rank",
                                             "mean cosine between samples"])

