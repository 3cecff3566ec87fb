"""Screenshot a TensorBoard page of a sweep with headless Chromium.

    python scripts/tensorboard_screenshot.py SWEEP_DIR --out docs/tensorboard_landing.png
    python scripts/tensorboard_screenshot.py SWEEP_DIR --page custom_scalars --out cs.png

Starts `tensorboard --logdir SWEEP_DIR` on a free localhost port, waits until it serves the
sweep's runs (and the page's data), lets Chromium render the page, writes the PNG and stops
TensorBoard. Needs Chromium (Debian: `apt-get install -y chromium`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PAGES = {"time_series": "timeseries", "custom_scalars": "custom_scalars", "hparams": "hparams"}
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ScreenshotError(RuntimeError):
    """A one-line reason the screenshot could not be made."""


def find_chromium(explicit: str | None = None) -> str:
    """Path of the Chromium binary: `explicit` if given, else the first of CHROMIUM_NAMES."""
    names = (explicit,) if explicit else CHROMIUM_NAMES
    for name in names:
        if found := shutil.which(name):
            return found
    tried = ", ".join(names)
    raise ScreenshotError(
        f"no Chromium found (tried {tried}): install it (Debian: apt-get install -y chromium) "
        "or pass --chromium PATH"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fetch_json(url: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read().decode())


# What each page draws, as the TensorBoard route that must answer non-empty before the shot.
PAGE_DATA = {
    "time_series": "/data/plugin/scalars/tags",
    "custom_scalars": "/data/plugin/custom_scalars/layout",
    "hparams": "/data/plugin/hparams/experiment",
}


def page_has_data(base: str, page: str) -> bool:
    """Does TensorBoard already serve what `page` draws (not just an empty run list)?"""
    if page == "hparams":
        experiment = fetch_json(base + PAGE_DATA[page], {"experimentName": ""})
        return bool(isinstance(experiment, dict) and experiment.get("hparamInfos"))
    return bool(fetch_json(base + PAGE_DATA[page]))


def wait_until_loaded(base: str, page: str, server: subprocess.Popen, timeout: float) -> list:
    """Poll until the run list is non-empty and unchanged for two polls and the page has data."""
    deadline, previous = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise ScreenshotError(f"tensorboard exited early (code {server.returncode})")
        try:
            runs = fetch_json(f"{base}/data/runs")
            if runs and runs == previous and page_has_data(base, page):
                return runs
            previous = runs
        except (OSError, ValueError):
            pass  # not listening yet
        time.sleep(1.0)
    raise ScreenshotError(f"no data for the {page} page after {timeout:.0f} s: "
                          f"{PAGE_DATA[page]} stayed empty (runs: {previous or 'none'})")


def start_tensorboard(logdir: Path, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
               "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"]
    with log.open("wb") as sink:
        return subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def screenshot(chromium: str, url: str, out: Path, size: str, budget_ms: int,
               profile: Path) -> None:
    profile.mkdir(parents=True, exist_ok=True)
    command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
               f"--virtual-time-budget={budget_ms}", f"--screenshot={out.resolve()}", url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=profile)
    if not (out.is_file() and out.read_bytes()[:8] == PNG_MAGIC):
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise ScreenshotError(f"chromium wrote no PNG (exit {done.returncode}): "
                              f"{lines[-1] if lines else 'no output'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the --logdir for TensorBoard")
    parser.add_argument("--out", type=Path, default=Path("docs/tensorboard_landing.png"))
    parser.add_argument("--page", choices=sorted(PAGES), default="time_series")
    parser.add_argument("--window-size", default="1600,1000", help="WIDTH,HEIGHT in pixels")
    parser.add_argument("--budget-ms", type=int, default=15000,
                        help="Chromium's --virtual-time-budget: how long the page may render")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for TensorBoard to serve the sweep's data")
    parser.add_argument("--chromium", help="Chromium binary (default: chromium on PATH)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"sweep_dir: no such directory: {args.sweep_dir}")
    try:
        chromium = find_chromium(args.chromium)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.unlink(missing_ok=True)  # so a stale file never passes for a new screenshot
        with tempfile.TemporaryDirectory(prefix="tb_shot_") as tmp:
            port = free_port()
            server = start_tensorboard(args.sweep_dir, port, Path(tmp) / "tensorboard.log")
            base = f"http://127.0.0.1:{port}"
            try:
                runs = wait_until_loaded(base, args.page, server, args.timeout)
                # forceSVG: Time Series draws its line charts as SVG; its default WebGL
                # renderer (in a worker) leaves them blank in headless Chromium without a GPU.
                url = f"{base}/?forceSVG=true#{PAGES[args.page]}"
                screenshot(chromium, url, args.out, args.window_size, args.budget_ms,
                           Path(tmp) / "profile")
            finally:
                stop(server)
    except (ScreenshotError, subprocess.TimeoutExpired) as error:
        print(f"tensorboard_screenshot: error: {error}", file=sys.stderr)
        return 1
    print(f"{args.out} ({args.page}, runs: {', '.join(map(str, runs))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
