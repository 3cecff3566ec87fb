"""Figures fit for a paper: formats read back, one TensorBoard colour per group in every figure,
labels, seeds captions, legends off the data; the TensorBoard screenshot script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.text import Text
from PIL import Image
from test_report import make_job

from normlab.results.figures import fig1_figure, load_runs
from normlab.results.plotstyle import (
    TENSORBOARD_PALETTE,
    group_colors,
    parse_formats,
    save_figure,
    start_time,
    tensorboard_order,
)
from normlab.results.report import job_scalars, jobs_frame, plot_curves, plot_ics, write_report

NONE_COLOR, BN_COLOR = TENSORBOARD_PALETTE[:2]


def sweep_of(tmp_path: Path, norms: list[str], seeds: list[int]) -> Path:
    """A hand-made sweep: jobs written (so started) in the order norms x seeds, with ICS."""
    sweep = tmp_path / "sweep"
    jobs = [(norm, seed) for norm in norms for seed in seeds]
    for num, (norm, seed) in enumerate(jobs):
        overrides = [f"norm={norm}"] + ([f"seed={seed}"] if len(seeds) > 1 else [])
        make_job(sweep, num, overrides, val_acc=0.9 + 0.01 * num, ics=True)
    return sweep


def report_figures(sweep: Path):
    jobs = jobs_frame(sweep)
    scalars = job_scalars(sweep, jobs)
    return plot_curves(jobs, scalars), plot_ics(jobs, scalars)


def drawn(fig):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


# ---------------------------------------------------------------- colours


def test_the_colour_rule_is_tensorboards_run_order_start_time_then_name():
    starts = [("norm=none", 5.0), ("norm=bn", 7.0), ("norm=bn", 4.0), ("norm=gn", 9.0),
              ("norm=ln", 9.0), ("norm=rms", float("nan"))]
    order = tensorboard_order(starts)
    assert order == ["norm=bn", "norm=none", "norm=gn", "norm=ln", "norm=rms"]
    colors = group_colors(order + [f"g{i}" for i in range(3)])
    assert list(colors.values())[:2] == ["#425066", "#12b5cb"]  # TensorBoard's Slate, Cyan
    assert colors["g2"] == colors["norm=bn"]  # the 8th group wraps around the 7 colours


def test_start_time_is_the_first_event_of_the_run(tmp_path):
    first = make_job(tmp_path, 0, ["norm=none"], val_acc=0.9)
    second = make_job(tmp_path, 1, ["norm=bn"], val_acc=0.9)
    assert 0 < start_time(first) <= start_time(second)
    assert start_time(tmp_path / "nowhere") == float("inf")


def group_colors_in(curves, ics, fig1) -> dict[str, set[str]]:
    """Every colour each figure gives each group, read from the drawn artists."""
    found: dict[str, set[str]] = {}
    for ax in curves.axes:
        for line in ax.get_lines():
            found.setdefault(line.get_label().split(" ")[0], set()).add(to_hex(line.get_color()))
    for ax in ics.axes:
        group = ax.get_title().split(":")[0]
        for line in ax.get_lines():
            found.setdefault(group, set()).add(to_hex(line.get_color()))
    accuracy, *panels = fig1.axes
    for line in accuracy.get_lines():
        found.setdefault(line.get_label().split(" ")[0], set()).add(to_hex(line.get_color()))
    for ax in panels:
        group = ax.get_title().split(" ")[1].rstrip(":")
        for line in ax.get_lines():
            found.setdefault(group, set()).add(to_hex(line.get_color()))
    return found


@pytest.mark.parametrize("seeds", [[0], [0, 1, 2]])
def test_a_group_has_one_colour_in_every_figure_the_one_tensorboard_gives_it(tmp_path, seeds):
    # norm=none ran first, so TensorBoard lists it first although "norm=bn" sorts before it.
    sweep = sweep_of(tmp_path, ["none", "bn"], seeds)
    curves, ics = report_figures(sweep)
    fig1 = fig1_figure(load_runs([sweep]))
    assert group_colors_in(curves, ics, fig1) == {"norm=none": {NONE_COLOR},
                                                  "norm=bn": {BN_COLOR}}


# ---------------------------------------------------------------- labels and legends


def test_every_data_axis_says_what_it_plots(tmp_path):
    sweep = sweep_of(tmp_path, ["none", "bn"], [0])
    curves, ics = report_figures(sweep)
    fig1 = fig1_figure(load_runs([sweep]))
    assert [ax.get_ylabel() for ax in curves.axes] == [
        "validation accuracy (val/acc)", "training loss (train/loss)"]
    assert all("input of the nonlinearity" in ax.get_ylabel() for ax in ics.axes[::2])
    assert fig1.axes[0].get_ylabel() == "validation accuracy (val/acc)"
    assert fig1.axes[1].get_ylabel() == "input of the nonlinearity (p15 / p50 / p85)"
    assert all(ax.get_xlabel() for ax in [*curves.axes, *ics.axes[2:], *fig1.axes])


def test_seed_captions_only_when_there_are_seeds_to_average(tmp_path):
    one = sweep_of(tmp_path / "one", ["none", "bn"], [0])
    words = " ".join(t for fig in (*report_figures(one), fig1_figure(load_runs([one])))
                     for t in texts(fig))
    assert "seed-mean" not in words and "mean of 1" not in words and "seeds" not in words
    three = sweep_of(tmp_path / "three", ["none", "bn"], [0, 1, 2])
    for fig in (*report_figures(three), fig1_figure(load_runs([three]))):
        assert "mean of 3 seeds" in " ".join(texts(fig))


def test_legends_lie_outside_every_axes(tmp_path):
    sweep = sweep_of(tmp_path, ["none", "bn"], [0, 1])
    for fig in (*report_figures(sweep), fig1_figure(load_runs([sweep]))):
        renderer = drawn(fig)
        assert fig.legends and not any(ax.get_legend() for ax in fig.axes)
        for legend in fig.legends:
            box = legend.get_window_extent(renderer)
            for ax in fig.axes:
                assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_title()


def test_fig1_percentiles_are_one_colour_solid_median_dashed_edges_and_a_band(tmp_path):
    sweep = sweep_of(tmp_path, ["none", "bn"], [0])
    fig1 = fig1_figure(load_runs([sweep]))
    for ax, color in zip(fig1.axes[1:], (NONE_COLOR, BN_COLOR), strict=True):
        styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
        assert styles == {"p15": "--", "p50": "-", "p85": "--"}
        assert {to_hex(line.get_color()) for line in ax.get_lines()} == {color}
        (band,) = ax.collections
        assert to_hex(band.get_facecolor()[0], keep_alpha=False) == color
    assert fig1.axes[1].get_ylim() == fig1.axes[2].get_ylim()  # shared y: spreads compare


# ---------------------------------------------------------------- formats


def read_back(path: Path) -> None:
    data = path.read_bytes()
    if path.suffix == ".png":
        assert Image.open(path).info["dpi"] == pytest.approx((200, 200), abs=0.01)
    elif path.suffix == ".pdf":
        assert data.startswith(b"%PDF-")
    else:
        assert data.startswith(b"<?xml") and b"<svg" in data[:1000]


def test_report_writes_each_requested_format(tmp_path):
    sweep = sweep_of(tmp_path, ["none", "bn"], [0])
    report = write_report(sweep, tmp_path / "out", formats=("png", "pdf", "svg"))
    names = sorted(p.name for p in report.files)
    assert names == sorted(["report.csv", *(f"report_{kind}.{fmt}" for kind in ("curves", "ics")
                                             for fmt in ("png", "pdf", "svg"))])
    for path in report.files[1:]:
        read_back(path)


def test_scripts_take_a_comma_list_of_formats(tmp_path):
    sweep = sweep_of(tmp_path, ["none", "bn"], [0])
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "fig1.py"), str(sweep),
                          "--out", str(tmp_path / "f" / "fig1.png"), "--format", "svg,png,pdf"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for fmt in ("png", "pdf", "svg"):
        read_back(tmp_path / "f" / f"fig1.{fmt}")
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(sweep),
                          "--format", "png,jpg"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[-1].endswith("--format: jpg is not one of png, pdf, svg "
                                                "(give a comma list, e.g. png,pdf)")


def test_parse_formats():
    assert parse_formats("png, PDF,.svg,png") == ("png", "pdf", "svg")
    assert parse_formats(["pdf"]) == ("pdf",)
    for bad in ("", "jpg", "png,eps"):
        with pytest.raises(ValueError, match="is not one of png, pdf, svg"):
            parse_formats(bad)


def test_save_figure_replaces_the_suffix(tmp_path):
    fig, _ = report_figures(sweep_of(tmp_path, ["none"], [0]))
    written = save_figure(fig, tmp_path / "a" / "curves.png", ("pdf", "png"))
    assert written == [tmp_path / "a" / "curves.pdf", tmp_path / "a" / "curves.png"]


# ---------------------------------------------------------------- unreadable records


def test_report_cli_skips_an_unreadable_metrics_json_and_names_it(tmp_path):
    sweep = sweep_of(tmp_path, ["none", "bn"], [0, 1])
    broken = sweep / "2" / "metrics.json"
    broken.write_text('{"status": "ok", "val/acc": 0.9')  # cut off mid-write
    (sweep / "2" / ".hydra" / "overrides.yaml").write_text("- norm=bn\n- seed=0\n")  # as Hydra
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(sweep)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    skipped = [line for line in out.stderr.splitlines() if "metrics.json" in line]
    assert len(skipped) == 1 and skipped[0].startswith(f"report: skipped {broken}: unreadable")
    assert "1 ok, 1 failed" in out.stdout  # the skipped job counts as failed, the rest reports
    assert (sweep / "report_ics.png").stat().st_size > 10_000


def test_interrupted_jobs_count_in_their_own_column(tmp_path):
    sweep = sweep_of(tmp_path, ["none"], [0, 1])
    record = json.loads((sweep / "1" / "metrics.json").read_text())
    (sweep / "1" / "metrics.json").write_text(json.dumps({**record, "status": "interrupted"}))
    report = write_report(sweep)
    assert report.groups.loc[0, "n_interrupted"] == 1 and "1 interrupted" in report.markdown


# ---------------------------------------------------------------- screenshot script

SHOT = [sys.executable, str(ROOT / "scripts" / "tensorboard_screenshot.py")]


def test_screenshot_script_says_in_one_line_when_chromium_is_missing(tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    out = subprocess.run([*SHOT, str(tmp_path), "--out", str(tmp_path / "s.png")],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1 and len(out.stderr.splitlines()) == 1
    assert out.stderr.startswith("tensorboard_screenshot: error: no Chromium found")
    assert "apt-get install -y chromium" in out.stderr and not (tmp_path / "s.png").exists()


def test_screenshot_script_checks_its_arguments(tmp_path):
    missing = subprocess.run([*SHOT, str(tmp_path / "nope")], capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 2 and "no such directory" in missing.stderr
    page = subprocess.run([*SHOT, str(tmp_path), "--page", "graphs"], capture_output=True,
                          text=True, timeout=60)
    assert page.returncode == 2 and "invalid choice: 'graphs'" in page.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (apt-get install "
                    "-y chromium)")
@pytest.mark.parametrize("page", ["time_series", "custom_scalars"])
def test_screenshot_of_a_sweep_shows_its_runs(tmp_path, page):
    from torch.utils.tensorboard import SummaryWriter

    sweep = sweep_of(tmp_path, ["none", "bn"], [0])
    with SummaryWriter(str(sweep / "0" / "tensorboard")) as writer:  # as the ICS callbacks do
        writer.add_custom_scalars({"ICS": {"layer1": [
            "Margin", ["ics/layer1/p50", "ics/layer1/p15", "ics/layer1/p85"]]}})
    shot = tmp_path / "shot.png"
    out = subprocess.run([*SHOT, str(sweep), "--out", str(shot), "--page", page],
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr
    image = Image.open(shot).convert("RGB")
    assert image.size == (1600, 1000)
    # A blank or error page has a handful of colours; a dashboard with charts has many.
    assert len(image.getcolors(maxcolors=1 << 20)) > 500
    if page == "time_series":  # the run list shows TensorBoard's first two run colours
        pixels = set(image.getdata())
        for color in (NONE_COLOR, BN_COLOR):
            assert tuple(int(color[i:i + 2], 16) for i in (1, 3, 5)) in pixels


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium")
def test_screenshot_script_names_the_missing_data_of_a_page(tmp_path):
    sweep = sweep_of(tmp_path, ["none"], [0])  # no custom-scalars layout logged
    out = subprocess.run([*SHOT, str(sweep), "--out", str(tmp_path / "s.png"), "--page",
                          "custom_scalars", "--timeout", "8"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and out.stderr == (
        "tensorboard_screenshot: error: no data for the custom_scalars page after 8 s: "
        "/data/plugin/custom_scalars/layout stayed empty (runs: ['0/tensorboard'])\n")
