"""Copy the scripts the book serves itself (MathJax 3, RequireJS, the Jupyter widget manager) out of
node_modules/ into _assets/_static/vendor/, which _config.yml hands to Sphinx as html_extra_path.

Run after `npm ci`. The built book then loads them from <book>/_static/vendor/... and needs no other host.
They are kept out of _static/ on purpose: Sphinx injects every .js file found there into every page.

The widget manager loads its icon fonts (Font Awesome, for button icons) from the folder of its AMD module,
which RequireJS resolves against the page: ``<page folder>/@jupyter-widgets/html-manager/dist/`` and
``<page folder>/@jupyter-widgets/``. The fonts are therefore copied to both paths for every folder that holds
pages (FONT_PAGE_DIRS), below _assets/.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NODE = ROOT / "node_modules"
TARGET = ROOT / "_assets" / "_static" / "vendor"

# (source inside node_modules, destination inside _assets/vendor)
ASSETS = [
    ("mathjax/es5", "mathjax"),
    ("requirejs/require.js", "requirejs/require.js"),
    ("@jupyter-widgets/html-manager/dist", "html-manager"),
]
FONTS = "@jupyter-widgets/html-manager/dist"
FONT_SUFFIXES = (".woff2", ".woff", ".ttf", ".eot", ".svg")
FONT_PAGE_DIRS = ["", "book", "notebooks"]  # folders of the built book that hold pages
FONT_TOP = "@jupyter-widgets"
# Two bundles inside embed-amd.js ask for the fonts, from two module folders (seen in Chromium):
FONT_SUBDIRS = ["@jupyter-widgets", "@jupyter-widgets/html-manager/dist"]


def vendor(node_modules: Path = NODE, target: Path = TARGET) -> list[Path]:
    """Copy each asset (replacing an older copy); returns the destination paths."""
    missing = [src for src, _ in ASSETS if not (node_modules / src).exists()]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not found in {node_modules}: run `npm ci` in {ROOT} first.")
    out = []
    for src, dst in ASSETS:
        s, d = node_modules / src, target / dst
        if d.exists():
            shutil.rmtree(d) if d.is_dir() else d.unlink()
        d.parent.mkdir(parents=True, exist_ok=True)
        if s.is_dir():
            shutil.copytree(s, d, ignore=shutil.ignore_patterns("*.map"))
        else:
            shutil.copy2(s, d)
        out.append(d)
    fonts = [f for f in sorted((node_modules / FONTS).iterdir()) if f.suffix in FONT_SUFFIXES]
    if not fonts:
        raise SystemExit(f"No font files in {node_modules / FONTS}: run `npm ci` in {ROOT} again.")
    for page_dir in FONT_PAGE_DIRS:
        top = target.parents[1] / page_dir / FONT_TOP
        if top.exists():
            shutil.rmtree(top)
        for sub in FONT_SUBDIRS:
            d = target.parents[1] / page_dir / sub
            d.mkdir(parents=True, exist_ok=True)
            for f in fonts:
                shutil.copy2(f, d / f.name)
            out.append(d)
    return out


if __name__ == "__main__":
    for path in vendor():
        print(f"vendored {path.relative_to(ROOT)}")
    sys.exit(0)
