"""normlab.results.report on hand-made sweep dirs: grouping, statistics, markdown, plots,
failed jobs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT

from normlab.results.report import (
    ICS_YLABEL,
    METRICS,
    epoch_curve,
    job_scalars,
    jobs_frame,
    markdown_table,
    plot_curves,
    plot_ics,
    write_report,
)

PNG = b"\x89PNG\r\n\x1a\n"


def make_job(sweep: Path, num: int, overrides: list[str], status: str = "ok",
             val_acc: float | None = None, epochs: int = 3, ics: bool = False) -> Path:
    """A job dir as train.py leaves it: metrics.json and (unless failed) an event file."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    record: dict = {"status": status, "overrides": overrides, "ics": {}}
    if status == "failed":
        record["error"] = "DatasetMissingError: MNIST files not found"
    else:
        record.update({"val/acc": val_acc, "test/acc": val_acc, "train/acc": val_acc,
                       "train/loss": 1 - val_acc})
        if ics:
            record["ics"] = {"layer1": {"p50_travel": 0.5 + num}, "layer2": {"p50_travel": 0.1}}
        write_events(job / "tensorboard", val_acc, epochs, ics)
    (job / "metrics.json").write_text(json.dumps(record))
    return job


def write_events(folder: Path, final_acc: float, epochs: int, ics: bool) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for epoch in range(epochs):
        step = 10 * (epoch + 1) - 1  # Lightning logs epoch-end values at the epoch's last step
        writer.add_scalar("epoch", epoch, step)
        writer.add_scalar("val/acc", final_acc * (epoch + 1) / epochs, step)
        writer.add_scalar("train/loss", 1.0 / (epoch + 1), step)
        for layer in ("layer1", "layer2") if ics else ():
            for name, value in (("p15", -1.0), ("p50", 0.0), ("p85", 1.0)):
                writer.add_scalar(f"ics/{layer}/{name}", value * (epoch + 1), step)
    writer.close()


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """norm=none,bn x seed=0,1,2 with one failed and one diverged job; common max_epochs."""
    accs = {("none", 0): 0.90, ("none", 1): 0.92, ("none", 2): 0.94,
            ("bn", 0): 0.96, ("bn", 1): 0.98, ("bn", 2): None}
    for num, ((norm, seed), acc) in enumerate(accs.items()):
        status = "failed" if acc is None else "diverged" if (norm, seed) == ("none", 2) else "ok"
        make_job(tmp_path, num, [f"norm={norm}", f"seed={seed}", "trainer.max_epochs=3"],
                 status=status, val_acc=acc, ics=True)
    return tmp_path


def test_jobs_that_differ_only_in_seed_form_a_group(sweep):
    report = write_report(sweep)
    groups = report.groups.set_index("group")
    assert list(groups.index) == ["norm=none", "norm=bn"]
    assert list(groups["n_seeds"]) == [3, 3] and list(groups["seeds"]) == ["0 1 2"] * 2
    assert groups.loc["norm=none", "val/acc mean"] == pytest.approx(0.92)
    assert groups.loc["norm=none", "val/acc std"] == pytest.approx(0.02)
    assert groups.loc["norm=bn", "val/acc mean"] == pytest.approx(0.97)  # failed seed left out
    assert (groups.loc["norm=bn", "n_ok"], groups.loc["norm=bn", "n_failed"]) == (2, 1)
    assert groups.loc["norm=none", "n_diverged"] == 1
    assert groups.loc["norm=none", "ics/layer1/p50_travel mean"] == pytest.approx(1.5)
    assert groups.loc["norm=none", "overrides"] == "norm=none trainer.max_epochs=3"
    assert pd.read_csv(sweep / "report.csv").shape[0] == 2


def test_markdown_table_has_one_row_per_group_and_the_ics_numbers(sweep):
    report = write_report(sweep)
    lines = report.markdown.splitlines()
    assert lines[0] == "Common overrides: trainer.max_epochs=3"
    rows = [line for line in lines if line.startswith("| norm=")]
    assert len(rows) == 2 + 4  # main table + ICS table (2 groups x 2 layers)
    assert "0.9200 ± 0.0200" in rows[0] and "2 ok, 1 diverged" in rows[0]
    assert "2 ok, 1 failed" in rows[1]
    assert "| norm=none | layer1 | 1.5000 |" in " ".join(report.markdown.split())


def test_plots_have_a_line_per_group_and_a_panel_per_layer(sweep):
    report = write_report(sweep)
    for path in report.files[1:]:
        assert path.read_bytes()[:8] == PNG
    jobs = jobs_frame(sweep)
    scalars = job_scalars(sweep, jobs)
    curves = plot_curves(jobs, scalars)
    for ax in curves.axes[:2]:
        assert len(ax.lines) == 2 and list(ax.lines[0].get_xdata()) == [1, 2, 3]
    ics = plot_ics(jobs, scalars)
    titles = [ax.get_title() for ax in ics.axes]  # one row of panels per group
    assert titles == ["norm=none: layer1 (mean of 3 seeds)", "norm=none: layer2 (mean of 3 seeds)",
                      "norm=bn: layer1 (mean of 2 seeds)", "norm=bn: layer2 (mean of 2 seeds)"]
    assert [ax.get_ylabel() for ax in ics.axes[::2]] == [ICS_YLABEL] * 2


def test_a_sweep_without_ics_scalars_gets_an_explaining_figure(tmp_path):
    for seed in (0, 1):
        make_job(tmp_path, seed, [f"seed={seed}"], val_acc=0.9)
    report = write_report(tmp_path)
    assert report.groups.shape[0] == 1 and "ICS summary" not in report.markdown
    jobs = jobs_frame(tmp_path)
    figure = plot_ics(jobs, job_scalars(tmp_path, jobs))
    assert "No ICS percentile scalars" in figure.texts[0].get_text()


def test_a_sweep_where_every_job_failed_still_reports(tmp_path):
    make_job(tmp_path, 0, ["data=mnist"], status="failed")
    (tmp_path / "1" / ".hydra").mkdir(parents=True)  # killed before writing metrics.json
    report = write_report(tmp_path)
    assert list(report.groups["n_failed"]) == [1, 1]
    assert all(p.read_bytes()[:8] == PNG for p in report.files[1:])


def test_epoch_curve_uses_the_epoch_scalar():
    scalars = {"val/acc": pd.Series({9: 0.5, 19: 0.7}), "epoch": pd.Series({9: 0.0, 19: 1.0})}
    assert epoch_curve(scalars, "val/acc").to_dict() == {1.0: 0.5, 2.0: 0.7}
    assert epoch_curve({"val/acc": scalars["val/acc"]}, "val/acc").to_dict() == {1: 0.5, 2: 0.7}
    assert epoch_curve({}, "val/acc").empty


def test_markdown_leaves_missing_numbers_blank():
    blank = {f"{m} {s}": math.nan for m in METRICS for s in ("mean", "std")}
    groups = pd.DataFrame([{"group": "g", "n_seeds": 1, "n_ok": 0, "n_failed": 1, **blank}])
    row = markdown_table(groups).splitlines()[2]
    cells = [cell.strip() for cell in row.split("|")]
    assert cells == ["", "g", "1", "", "", "", "", "1 failed", ""]


def test_cli_prints_the_table_and_fails_on_a_missing_dir(sweep, tmp_path):
    script = [sys.executable, str(ROOT / "scripts" / "report.py")]
    out = subprocess.run([*script, str(sweep)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "| norm=bn " in out.stdout
    missing = subprocess.run([*script, str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and "report: error" in missing.stderr
