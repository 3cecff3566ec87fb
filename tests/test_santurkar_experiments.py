"""The CPU santurkar_* experiment runs and shows the paper's effect (Santurkar et al. 2018,
Fig. 4)."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


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
