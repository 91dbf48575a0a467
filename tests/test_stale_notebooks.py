"""scripts/stale_notebooks.py: `make book` runs only the notebooks whose execution-cache entry is not current."""

from __future__ import annotations

from pathlib import Path

import nbformat
from by_path import load

ROOT = Path(__file__).resolve().parents[1]
sn = load("scripts/stale_notebooks.py")


def test_only_uncached_or_changed_notebooks_are_stale(tmp_path):
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    (tmp_path / "notebooks").mkdir()
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: intro\nparts:\n  - caption: A\n    chapters:\n"
                                      "      - file: notebooks/a\n      - file: notebooks/b\n")
    for name, code in (("a", "x = 1"), ("b", "y = 2")):
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)]),
                       tmp_path / "notebooks" / f"{name}.ipynb")
    cache_dir = tmp_path / "_build" / ".jupyter_cache"
    assert [p.name for p in sn.stale(tmp_path, cache_dir)] == ["a.ipynb", "b.ipynb"], "no cache: all stale"
    a = tmp_path / "notebooks" / "a.ipynb"
    get_cache(str(cache_dir)).cache_notebook_bundle(CacheBundleIn(nbformat.read(a, as_version=4), str(a)),
                                                    check_validity=False)
    assert [p.name for p in sn.stale(tmp_path, cache_dir)] == ["b.ipynb"]
    nb = nbformat.read(a, as_version=4)
    nb.cells[0].source = "x = 3"
    nbformat.write(nb, a)
    assert [p.name for p in sn.stale(tmp_path, cache_dir)] == ["a.ipynb", "b.ipynb"], "changed code: stale again"
