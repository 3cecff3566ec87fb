"""Sweep-level figures of `scripts/bench.py`: the real command line against a hand-written loop.

- `sweep_vs_hand_loop`: wall time of `python train.py -m norm=none,bn activation=relu,sigmoid
  seed=0,1,2` (12 digits jobs, a fresh process, imports included) / wall time of the same 12
  trainings as the for-loop of `scripts/hand_sweep.py` in one fresh process (same split, model,
  Adam 0.01, batch 32, 10 epochs, validation every epoch, a test, percentile probes at normlab's
  default ICS cadence). The two alternate, so both meet the same load; each figure is the fastest.
- `job_overhead_seconds`: a job's wall time inside the sweep (from the previous metrics.json of
  the same worker process to its own: Hydra's per-job work, set-up, fit, test, records) minus the
  optimizer-step time of the same training in the hand loop (forward, backward, update), median
  over the jobs after each worker's first.
- `default_sweep_seconds`: wall time of a cold `python train.py -m norm=none,bn`.

    python scripts/bench_sweep.py [--quick]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["norm=none,bn", "activation=relu,sigmoid", "seed=0,1,2"]


def default_probe_every() -> int:
    """The ICS cadence of the default run (conf/callbacks/default.yaml), for the hand loop."""
    import yaml

    callbacks = yaml.safe_load((ROOT / "conf" / "callbacks" / "default.yaml").read_text())
    return int(callbacks["ics"]["every_n_steps"])


def _timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return seconds


def hand_loop(out: Path) -> float:
    """Wall time of scripts/hand_sweep.py in a fresh process."""
    script = str(ROOT / "scripts" / "hand_sweep.py")
    return _timed([sys.executable, script, str(out), "--probe-every", str(default_probe_every())])


def cli_sweep(out: Path, overrides: list[str]) -> float:
    """Wall time of `python train.py -m OVERRIDES` in a fresh process."""
    return _timed([sys.executable, "train.py", "-m", *overrides, f"hydra.sweep.dir={out}"])


def job_overheads(sweep_dir: Path, hand_dir: Path) -> list[float]:
    """Per job after a worker's first: its wall time in its worker (from that worker's previous
    metrics.json to its own: compose, set-up, fit, test, records) - the hand loop's step time.
    A job's worker is the pid in its `.running` marker (one process when jobs run in-process)."""
    by_worker: dict[int, list[Path]] = {}
    for metrics in sweep_dir.glob("*/metrics.json"):
        pid = json.loads((metrics.parent / ".running").read_text())["pid"]
        by_worker.setdefault(pid, []).append(metrics)
    overheads = []
    for jobs in by_worker.values():
        jobs.sort(key=lambda p: p.stat().st_mtime)
        for before, metrics in zip(jobs, jobs[1:], strict=False):
            wall = metrics.stat().st_mtime - before.stat().st_mtime
            choice = dict(o.split("=", 1) for o in json.loads(metrics.read_text())["overrides"])
            name = f"{choice['norm']}-{choice['activation']}-{choice['seed']}.json"
            overheads.append(wall - json.loads((hand_dir / name).read_text())["step_seconds"])
    return overheads


def sweep_figures(quick: bool = False) -> dict[str, float]:
    rounds = 1 if quick else 2
    hand, sweep, overheads = [], [], []
    with tempfile.TemporaryDirectory(prefix="normlab-sweep-bench-") as tmp:
        for round_ in range(rounds):
            hand_dir, sweep_dir = Path(tmp, f"hand{round_}"), Path(tmp, f"sweep{round_}")
            for contender in ("hand", "sweep") if round_ % 2 == 0 else ("sweep", "hand"):
                if contender == "hand":
                    hand.append(hand_loop(hand_dir))
                else:
                    sweep.append(cli_sweep(sweep_dir, SWEEP))
            overheads += job_overheads(sweep_dir, hand_dir)
        default = cli_sweep(Path(tmp, "default"), ["norm=none,bn"])
    return {
        "sweep_vs_hand_loop": min(sweep) / min(hand),
        "job_overhead_seconds": round(statistics.median(overheads), 3),
        "default_sweep_seconds": round(default, 2),
        "sweep_seconds": {"normlab": round(min(sweep), 2), "hand_loop": round(min(hand), 2)},
    }


if __name__ == "__main__":
    print(json.dumps(sweep_figures(quick="--quick" in sys.argv), indent=2))
