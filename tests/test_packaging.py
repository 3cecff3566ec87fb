import subprocess
import sys
import zipfile

from conftest import ROOT

from normlab.config import CONFIG_DIR


def test_configs_found_from_checkout():
    assert (CONFIG_DIR / "train.yaml").exists()
    assert {p.stem for p in (CONFIG_DIR / "norm").glob("*.yaml")} >= {"none", "bn"}


def test_wheel_carries_the_configs(tmp_path):
    """A non-editable install must find conf/ inside the package (normlab/conf)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=240,
    )
    (wheel,) = tmp_path.glob("normlab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"normlab/conf/{p.relative_to(CONFIG_DIR)}" for p in CONFIG_DIR.rglob("*.yaml")}
    assert expected <= names
    assert "normlab/config/__init__.py" in names and "normlab/train.py" in names
    assert "hydra_plugins/normlab_slurm/slurm_launcher.py" in names  # hydra/launcher=submitit_slurm
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    probe = "import normlab.config as c; print(c.CONFIG_DIR)"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target)},
        check=True,
    ).stdout.strip()
    assert out == str(target / "normlab" / "conf")


def test_shim_is_three_lines_and_guarded():
    lines = [line for line in (ROOT / "train.py").read_text().splitlines() if line.strip()]
    assert len(lines) == 3 and lines[1].startswith('if __name__ == "__main__"')
