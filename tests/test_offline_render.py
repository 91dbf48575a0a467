"""scripts/check_offline_render.py on two tiny hand-made sites: one served locally, one that needs a CDN.

Needs Debian's chromium (``make setup`` installs it where it can) and the vendored MathJax (``npm ci``);
skipped where either is missing, except under CI (``CI=true``), where a missing browser fails the run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from by_path import load

ROOT = Path(__file__).resolve().parents[1]
MATHJAX = ROOT / "node_modules" / "mathjax" / "es5"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

if IN_CI and not (CHROMIUM and MATHJAX.is_dir()):
    raise RuntimeError("CI=true but chromium or node_modules is missing: the offline render check must run in CI. "
                       "Install them (apt-get install -y chromium; npm ci) before the tests.")
pytestmark = pytest.mark.skipif(not (CHROMIUM and MATHJAX.is_dir()),
                                reason="needs chromium (apt-get install chromium) and node_modules (npm ci)")

PAGE = """<!doctype html><html><head><title>{title}</title>
<script>window.MathJax = {{tex: {{inlineMath: [['\\\\(', '\\\\)']]}}}};</script>
<script defer src="{mathjax}"></script></head>
<body><p>Pythagoras: <span class="math notranslate nohighlight">\\(a^2 + b^2 = c^2\\)</span></p></body></html>
"""


def _load_checker():
    return load("scripts/check_offline_render.py")


def _site(tmp_path: Path, mathjax_src: str) -> Path:
    site = tmp_path / "html"
    shutil.copytree(MATHJAX, site / "mathjax", ignore=shutil.ignore_patterns("*.map", "sre"))
    (site / "index.html").write_text(PAGE.format(title="local", mathjax=mathjax_src))
    return site


def test_local_maths_passes(tmp_path, capsys):
    checker = _load_checker()
    site = _site(tmp_path, "mathjax/tex-chtml.js")
    rc = checker.main([str(site), "--no-unshare", "--screenshots", str(tmp_path / "shots"), "--wait", "20"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS  index.html  (maths 1/1" in out
    assert (tmp_path / "shots" / "index.png").read_bytes().startswith(b"\x89PNG")


def test_cdn_maths_fails_with_reasons(tmp_path, capsys):
    checker = _load_checker()
    site = _site(tmp_path, "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-chtml.js")
    rc = checker.main([str(site), "--no-unshare", "--no-screenshots", "--wait", "5"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "FAIL  index.html" in out
    assert "request to another host: https://cdn.jsdelivr.net/" in out
    assert "MathJax is not loaded" in out and "raw TeX left in the text" in out


def test_missing_local_file_fails(tmp_path, capsys):
    checker = _load_checker()
    site = _site(tmp_path, "mathjax/tex-chtml.js")
    page = (site / "index.html").read_text().replace("</body>", '<img src="no-such-icon.svg"></body>')
    (site / "index.html").write_text(page)
    rc = checker.main([str(site), "--no-unshare", "--no-screenshots", "--wait", "20"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "missing local file (HTTP 404): /no-such-icon.svg" in out


ASSETS = ROOT / "_assets"


@pytest.mark.skipif(not (ASSETS / "notebooks" / "@jupyter-widgets").is_dir(),
                    reason="needs the vendored assets (python scripts/vendor_assets.py after npm ci)")
def test_widget_icon_fonts_are_served(tmp_path, capsys):
    """A button with an icon, on a page one folder down like the notebook pages: every font it asks for exists."""
    checker = _load_checker()
    site = tmp_path / "html"
    shutil.copytree(ASSETS / "_static", site / "_static")
    shutil.copytree(ASSETS / "notebooks", site / "notebooks")
    shutil.copy2(ROOT / "tests" / "widget_icon_page.html", site / "notebooks" / "page.html")
    args = [str(site), "--pages", "notebooks/page.html", "--no-unshare", "--no-screenshots", "--wait", "20"]
    assert checker.main(args) == 0, capsys.readouterr().out
    shutil.rmtree(site / "notebooks" / "@jupyter-widgets")
    assert checker.main(args) == 1, "without the fonts the page must fail"
    assert ".woff2" in capsys.readouterr().out
