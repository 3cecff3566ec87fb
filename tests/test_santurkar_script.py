"""scripts/santurkar.py: reads runs back from disk, the table's numbers, the figure file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(ROOT / "scripts"))
import santurkar  # noqa: E402


def fake_run(directory: Path, norm: str, seed: int, scale: float, lr: float = 0.1) -> None:
    """A run dir as train.py leaves it, landscape numbers `scale` x a known curve."""
    (directory / ".hydra").mkdir(parents=True)
    (directory / ".hydra" / "config.yaml").write_text(f"seed: {seed}\nlr: {lr}\n")
    (directory / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  runtime:\n    choices:\n      norm: {norm}\n"
    )
    (directory / "metrics.json").write_text(json.dumps({"status": "ok"}))
    writer = SummaryWriter(str(directory / "tensorboard"))
    for step in range(0, 100, 10):
        late = 10.0 if step > 33 else 1.0  # only the first third counts in the table
        writer.add_scalar("landscape/grad_pred_max", scale * late * (1 + seed), step)
        writer.add_scalar("landscape/beta_smooth", scale * 2, step)
        writer.add_scalar("landscape/loss_min", 1.0, step)
        writer.add_scalar("landscape/loss_max", 1.0 + scale * late, step)
        writer.add_scalar("ics/layer2/grad_shift", scale, step)
        for name, value in (("p15", -1.0), ("p50", 0.0), ("p85", 1.0)):
            writer.add_scalar(f"ics/layer2/{name}", value * scale, step)
        writer.add_scalar("val/acc", 0.5 + step / 1000, step)
    writer.close()


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    for seed in (0, 1, 2):
        fake_run(tmp_path / f"none{seed}", "none", seed, scale=4.0)
        fake_run(tmp_path / f"bn{seed}", "bn", seed, scale=1.0)
    return tmp_path


def test_table_compares_each_seed_with_none_over_the_early_steps(sweep):
    runs = santurkar.load_runs([sweep])
    assert len(runs) == 6 and {r.norm for r in runs} == {"none", "bn"}
    table = santurkar.early_table(runs, early=1 / 3)
    rows = {line.split(" | ")[1]: line for line in table.splitlines() if line.startswith("| 0.1")}
    # grad_pred_max: seeds give 1, 2, 3 (x4 without BN) in steps 0..30; ratio 0.25 for each seed
    assert "| 2 ± 1 | 0.25 ± 0 |" in rows["bn"]
    assert "| 8 ± 4 | - |" in rows["none"]
    # loss band 1 vs 4, beta 2 vs 8: ratios 0.25
    assert rows["bn"].count("0.25 ± 0") == 3
    assert "steps <= 30" in table


@pytest.mark.slow  # spawns processes: in CI's `pytest -m slow`, out of the default run
def test_cli_writes_the_figure(sweep, tmp_path):
    out = tmp_path / "fig" / "santurkar.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "santurkar.py"), str(sweep), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 10_000 and str(out) in proc.stdout
    assert "| 0.1 | bn | 3 | ok |" in proc.stdout


def test_cli_without_runs_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "santurkar.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1 and "no runs" in proc.stderr and "Traceback" not in proc.stderr
