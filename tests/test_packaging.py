"""The library as users install it: a wheel built from a clean clone, installed non-editable with --no-deps into a
fresh virtual environment on top of the project's pins, and a smoke run from a folder outside the checkout.

The floors of pyproject.toml are tested the same way: the oldest allowed versions of the packages a Colab
runtime already has (transformers, ipywidgets, gguf, accelerate) are installed over the pins and the smoke
script and the widget tests run there. That test downloads those versions (marker ``network``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "scripts" / "smoke_install.py"
PINS_SITE = sysconfig.get_paths()["purelib"]  # the project's pinned packages (this interpreter's venv)
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Packages Colab preinstalls whose floors pyproject.toml lowers below our pins; each floor is installed and tested.
FLOOR_TESTED = ["transformers", "ipywidgets", "gguf", "accelerate"]


def _pip(*args: str, python: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--disable-pip-version-check", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a clean clone of the committed HEAD."""
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run(["git", "clone", "-q", str(ROOT), str(work / "clone")], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(work / "dist"), str(work / "clone")], check=True)
    (built,) = (work / "dist").glob("engram_helpers-*.whl")
    return built


def fresh_venv(where: Path, wheel: Path) -> Path:
    """A virtual environment holding only the wheel (non-editable, --no-deps) and a .pth line to the pins.

    The pins' folder is added as a plain path, so the .pth files inside it (among them the editable install
    of engram_helpers) are not run: only the installed wheel provides engram_helpers."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "project-pins.pth").write_text(PINS_SITE + "\n")
    _pip("--no-deps", str(wheel), python=python)
    return python


def run_smoke(python: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    return subprocess.run([str(python), str(SMOKE)], capture_output=True, text=True, cwd=cwd, timeout=1200,
                          env={**clean, "OMP_NUM_THREADS": "1", **env})


def test_wheel_ships_every_data_file(wheel):
    tracked = subprocess.run(["git", "ls-files", "engram_helpers"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    data_files = [f for f in tracked if not f.endswith(".py")]
    assert "engram_helpers/facts.json" in data_files
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in data_files if f not in names]
    assert not missing, f"the wheel lacks {missing}: add their pattern to [tool.setuptools.package-data]"
    meta = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info/METADATA")
    assert b"Requires-Python: >=3.11" in meta


@pytest.mark.slow
def test_installed_wheel_runs_the_smoke_script(wheel, tmp_path):
    python = fresh_venv(tmp_path / "venv", wheel)
    done = run_smoke(python, tmp_path / "elsewhere")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"from {tmp_path / 'venv'}" in done.stdout, f"imported the wrong engram_helpers: {done.stdout[:300]}"
    assert "smoke test passed" in done.stdout


def floors() -> dict[str, str]:
    out = {}
    for line in PROJECT["dependencies"]:
        req = Requirement(line)
        lows = [s.version for s in req.specifier if s.operator == ">="]
        if req.name in FLOOR_TESTED:
            assert lows, f"{req.name}: declare a floor (>=) in pyproject.toml"
            out[req.name] = lows[0]
    assert set(out) == set(FLOOR_TESTED)
    return out


@pytest.mark.slow
@pytest.mark.network
def test_dependency_floors_really_work(wheel, tmp_path):
    """The oldest allowed versions (with what they need, e.g. older tokenizers) over the pins: the default model
    converts from GGUF (empty cache), traces, edits and undoes, and the explorers' tests pass."""
    python = fresh_venv(tmp_path / "venv", wheel)
    _pip(*(f"{name}=={version}" for name, version in floors().items()), python=python)
    versions = subprocess.run([str(python), "-c", "import importlib.metadata as m, json; print(json.dumps({n: "
                               f"m.version(n) for n in {FLOOR_TESTED!r}}}))"], capture_output=True, text=True,
                              check=True).stdout
    installed = {name: Version(v) for name, v in json.loads(versions).items()}
    assert installed == {name: Version(v) for name, v in floors().items()}, versions  # the floors, not the pins
    done = run_smoke(python, tmp_path / "elsewhere", ENGRAM_CACHE=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    widgets = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                              str(ROOT / "tests" / "test_widgets.py")], capture_output=True, text=True,
                             cwd=tmp_path / "elsewhere", timeout=1200,
                             env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"})
    assert widgets.returncode == 0, widgets.stdout[-3000:]
