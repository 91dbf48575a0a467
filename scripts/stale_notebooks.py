"""Print the notebooks of _toc.yml that have no current entry in the book's execution cache (space-separated).

    python scripts/stale_notebooks.py        # e.g. "notebooks/rome.ipynb notebooks/explorers.ipynb"

``make book`` runs only these under nbval (which stores them in the cache) before the book build. A notebook
counts as current when jupyter-cache matches its code cells (myst-nb's ``execute_notebooks: cache`` rule).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "_build" / ".jupyter_cache"


def toc_notebooks(root: Path = ROOT) -> list[Path]:
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    return [root / f"{f}.ipynb" for f in files if (root / f"{f}.ipynb").exists()]


def stale(root: Path = ROOT, cache_dir: Path = CACHE) -> list[Path]:
    notebooks = toc_notebooks(root)
    if not (cache_dir / "global.db").exists():
        return notebooks
    from jupyter_cache import get_cache

    cache = get_cache(str(cache_dir))
    out = []
    for path in notebooks:
        try:
            cache.match_cache_notebook(nbformat.read(path, as_version=4))
        except KeyError:
            out.append(path)
    return out


if __name__ == "__main__":
    print(" ".join(str(p.relative_to(ROOT)) for p in stale()))
    sys.exit(0)
