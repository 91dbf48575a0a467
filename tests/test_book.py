"""The book: configuration (fast checks) and the full build with -W (marker ``book``, run with --book after
the notebooks' nbval run), whose pages must load nothing from another host."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
COURSE = __import__("tomllib").loads((ROOT / "course.toml").read_text())["course"]  # scripts/stamp.py's source
REPO = COURSE["repository"]


def toc_files() -> list[str]:
    files = [TOC["root"]]
    for part in TOC["parts"]:
        files += [c["file"] for c in part["chapters"]]
    return files


def source_of(entry: str) -> Path | None:
    for suffix in (".md", ".ipynb"):
        if (ROOT / (entry + suffix)).exists():
            return ROOT / (entry + suffix)
    return None


# ---------------------------------------------------------------- configuration (fast)


def test_toc_order_and_parts():
    assert TOC["format"] == "jb-book" and TOC["root"] == "book/intro"
    assert [p["caption"] for p in TOC["parts"]] == [
        "Foundations", "Formation", "Retrieval", "Modification", "Forgetting", "Consolidation", "Looking back",
        "For teachers and reference"]
    assert toc_files()[1:] == [
        "book/engram", "book/formation", "notebooks/grafting", "book/retrieval", "notebooks/causal_tracing",
        "book/modification", "notebooks/toy_memory", "notebooks/rome", "notebooks/explorers", "book/forgetting",
        "notebooks/forgetting", "book/consolidation", "notebooks/consolidation", "book/replication",
        "notebooks/replication", "book/limits",
        "book/instructors", "book/glossary", "book/bibliography"]


def test_every_toc_entry_exists():
    missing = [f for f in toc_files() if source_of(f) is None]
    assert not missing, f"_toc.yml lists files that do not exist: {missing}"
    for entry in toc_files():
        if entry.startswith("notebooks/"):
            assert source_of(entry).suffix == ".ipynb", f"{entry} must be a notebook"


def test_glued_figures_come_from_the_page_itself():
    """myst-nb's ``{glue:figure}`` looks a key up in the page's own glue data only: a figure from a notebook
    must be pasted with ``{glue}`` and its ``:doc:`` option (a ``path::key`` argument is one unknown key, and the
    build with -W fails on it)."""
    wrong = [(md.name, key) for md in sorted((ROOT / "book").glob("*.md"))
             for key in re.findall(r"```\{glue:figure\}\s+(\S+)", md.read_text(encoding="utf-8")) if "::" in key]
    assert not wrong, f"use ```{{glue}} KEY with :doc: PATH instead of {{glue:figure}} PATH::KEY: {wrong}"


def test_execution_and_offline_settings():
    ex = CONFIG["execute"]
    assert ex["execute_notebooks"] == "cache" and ex["timeout"] == 900
    assert ex["raise_on_error"] is True and ex["allow_errors"] is False
    assert CONFIG["only_build_toc_files"] is True
    for pattern in ("_build", ".venv", "node_modules", "tests", "notebooks/student", "_assets"):
        assert pattern in CONFIG["exclude_patterns"], pattern
    sphinx = CONFIG["sphinx"]["config"]
    scripts = [sphinx["mathjax_path"], *sphinx["nb_ipywidgets_js"]]
    for script in scripts:
        assert "://" not in script and not script.startswith("/"), f"{script} must be served by the book"
    # Sphinx resolves these relative to the output's _static/; html_extra_path puts them there, while the
    # source tree has no _static/vendor (each .js under a source _static/ would be injected into every page).
    assert sphinx["html_extra_path"] == ["_assets"]
    assert not (ROOT / "_static" / "vendor").exists()
    assert CONFIG["repository"]["url"] == REPO and CONFIG["repository"]["branch"] == COURSE["ref"]
    assert CONFIG["launch_buttons"]["colab_url"] == "https://colab.research.google.com"


def test_notebooks_are_committed_without_outputs():
    """Outputs saved in a notebook go stale when its code changes (a reader on GitHub or Colab would see numbers
    of an older version); the book shows the executed ones from the execution cache instead."""
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        stale = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
                 and (c.get("outputs") or c.get("execution_count") is not None)]
        assert not stale and "widgets" not in nb["metadata"], (
            f"{path.name}: code cells {stale} (or the widget state) carry outputs; clear them before committing "
            f"(jupyter nbconvert --clear-output --inplace {path.relative_to(ROOT)})")


def test_notebooks_hide_their_colab_cell():
    for entry in toc_files():
        src = source_of(entry)
        if src is None or src.suffix != ".ipynb":
            continue
        import nbformat

        nb = nbformat.read(src, as_version=4)
        first = nb.cells[0]
        assert first.cell_type == "code" and "google.colab" in first.source, \
            f"{src.name}: first cell must be the Colab install cell"
        assert "remove-cell" in first.metadata.get("tags", []), f"{src.name}: tag the Colab cell 'remove-cell'"
        assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{src.name}: kernelspec must be python3"


# ---------------------------------------------------------------- the built book (--book)


class ExternalRefs(HTMLParser):
    """Collects URLs of resources a page *loads* (scripts, styles, images, frames, media, fonts)."""

    LOADING = {"script": "src", "img": "src", "iframe": "src", "embed": "src", "source": "src", "audio": "src",
               "video": "src", "track": "src", "object": "data", "input": "src"}

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self._style = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in self.LOADING and a.get(self.LOADING[tag]):
            self.urls.append(a[self.LOADING[tag]])
        if tag == "img" and a.get("srcset"):
            self.urls += [s.strip().split(" ")[0] for s in a["srcset"].split(",")]
        if tag == "link" and a.get("href"):
            rel = (a.get("rel") or "").lower().split()
            if set(rel) & {"stylesheet", "preload", "modulepreload", "icon", "manifest", "prefetch", "preconnect",
                           "dns-prefetch"}:
                self.urls.append(a["href"])
        if a.get("style"):
            self.urls += css_urls(a["style"])
        self._style = tag == "style"

    def handle_endtag(self, tag):
        self._style = False

    def handle_data(self, data):
        if self._style:
            self.urls += css_urls(data)


def css_urls(css: str) -> list[str]:
    return re.findall(r"url\(\s*['\"]?([^'\")\s]+)", css) + re.findall(r"@import\s+['\"]([^'\"]+)", css)


def external(urls: list[str]) -> list[str]:
    return [u for u in urls if urlparse(u).scheme in ("http", "https") or u.startswith("//")]


def test_external_ref_detector_catches_loads_and_ignores_links():
    page = ('<html><head><script src="https://cdn.example/x.js"></script><link rel="stylesheet" '
            'href="//fonts.example/a.css"><style>@import "http://x.example/b.css"; p{background:url(https://i.example/c.png)}'
            '</style><script src="_static/ok.js"></script></head><body><a href="https://colab.research.google.com/">'
            'Colab</a><img src="../_images/fine.png"></body></html>')
    p = ExternalRefs()
    p.feed(page)
    assert sorted(external(p.urls)) == sorted(["https://cdn.example/x.js", "//fonts.example/a.css",
                                               "http://x.example/b.css", "https://i.example/c.png"])


@pytest.fixture(scope="session")
def built():
    """Build the book with -W (warnings are errors) into _build/html; returns the build log."""
    env = {**os.environ, "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    # --all: every page is read again, so the log names each notebook (cached or executed) also when an
    # earlier build left _build/html in place; notebooks still come from the execution cache.
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(ROOT), "-W", "--keep-going", "--all"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    log = out.stdout + out.stderr
    (ROOT / "_build").mkdir(exist_ok=True)
    (ROOT / "_build" / "book-build.log").write_text(log)
    assert out.returncode == 0, "jupyter-book build -W failed:\n" + log[-6000:]
    return log


@pytest.mark.book
def test_build_used_cached_notebooks(built):
    """With ENGRAM_EXPECT_CACHED=1 (set by `make test` after nbval) no notebook may be executed again."""
    executed = re.findall(r"(\S+\.ipynb): Executing notebook", built)
    if os.environ.get("ENGRAM_EXPECT_CACHED") == "1":
        assert not executed, f"these notebooks were executed again instead of taken from the cache: {executed}"
    cached = re.findall(r"(\S+\.ipynb): Using cached notebook", built)
    notebooks = [e for e in toc_files() if e.startswith("notebooks/")]
    assert len(cached) + len(executed) == len(notebooks)


@pytest.mark.book
def test_every_toc_page_built(built):
    for entry in toc_files():
        assert (HTML / f"{entry}.html").exists(), entry


@pytest.mark.book
def test_no_page_loads_from_another_host(built):
    pages = sorted(HTML.rglob("*.html"))
    assert len(pages) >= len(toc_files())
    offenders = {}
    for page in pages:
        p = ExternalRefs()
        p.feed(page.read_text(encoding="utf-8"))
        if ext := external(p.urls):
            offenders[str(page.relative_to(HTML))] = ext
    for css in sorted((HTML / "_static").rglob("*.css")):
        if ext := external(css_urls(css.read_text(encoding="utf-8", errors="replace"))):
            offenders[str(css.relative_to(HTML))] = ext
    assert not offenders, f"pages load resources from other hosts: {offenders}"


@pytest.mark.book
def test_chapter_figures_have_alt_text(built):
    """Every image on a chapter page describes itself: a ```{figure} by its :alt:, a figure pasted from a notebook
    by its caption (_ext/glued_alt.py), a figure drawn by a code cell by its `mystnb: image: alt:` option; without
    them the HTML's alt would be the image's file name."""
    missing = {}
    for page in sorted((HTML / "book").glob("*.html")):
        for tag in re.findall(r"<img\b[^>]*>", page.read_text(encoding="utf-8")):
            if 'src="../_static/' in tag:  # the theme's own icons (e.g. the Colab logo of the launch button)
                continue
            alt = re.search(r'\balt="([^"]*)"', tag)
            if alt is None or len(alt.group(1)) < 20 or re.fullmatch(r"[./\w-]+\.(png|svg|jpe?g)", alt.group(1)):
                missing.setdefault(page.name, []).append(tag[:120])
    assert not missing, f"images without a description: {missing}"


@pytest.mark.book
def test_maths_and_widgets_served_locally(built):
    mathjax = HTML / "_static" / "vendor" / "mathjax" / "tex-chtml.js"
    assert mathjax.exists() and (HTML / "_static/vendor/mathjax/output/chtml/fonts/woff-v2").is_dir()
    assert (HTML / "_static/vendor/requirejs/require.js").exists()
    assert (HTML / "_static/vendor/html-manager/embed-amd.js").exists()
    math_pages = widget_pages = 0
    for page in HTML.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        scripts = re.findall(r'<script[^>]*src="([^"]+)"', text)
        if "tex-chtml.js" in text:
            math_pages += 1
            src = next(s for s in scripts if "tex-chtml.js" in s)
            assert (page.parent / src.split("?")[0]).resolve() == mathjax.resolve(), page
        if "application/vnd.jupyter.widget-state+json" in text:
            widget_pages += 1
            for name in ("require.js", "embed-amd.js"):
                src = next((s for s in scripts if s.split("?")[0].endswith(name)), None)
                assert src is not None, f"{page}: widget page without {name}"
                assert (page.parent / src.split("?")[0]).resolve().exists(), f"{page}: {src} missing"
    assert math_pages > 0, "no page loads MathJax: is there maths in the book?"
    with_widgets = [e for e in toc_files() if e.startswith("notebooks/")
                    and re.search(r"ipywidgets|widgets\.|import widgets", source_of(e).read_text())]
    if with_widgets:
        assert widget_pages > 0, f"{with_widgets} use widgets but no built page carries a widget state"


@pytest.mark.book
def test_notebook_pages_offer_colab_and_hide_install_cell(built):
    for entry in toc_files():
        if not entry.startswith("notebooks/"):
            continue
        text = (HTML / f"{entry}.html").read_text(encoding="utf-8")
        slug = REPO.removeprefix("https://github.com/")
        assert f"https://colab.research.google.com/github/{slug}/blob/{COURSE['ref']}/{entry}.ipynb" in text
        student = f"https://colab.research.google.com/github/{slug}/blob/{COURSE['student_branch']}/{entry}.ipynb"
        assert student in text, f"{entry}: link to the student version"
        assert "google.colab" not in text, f"{entry}: the Colab install cell must be hidden (remove-cell)"
        assert 'class="output traceback' not in text and "Traceback (most recent call last)" not in text, entry


# ---------------------------------------------------------------- nbval fills the book's execution cache


def _notebook(cells: list[str]):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# A notebook\n\nMaths: $a^2$.")]
    nb.cells += [nbformat.v4.new_code_cell(c) for c in cells]
    return nb


def test_nbval_run_is_reused_by_the_book_build(tmp_path):
    """notebooks/conftest.py stores what nbval executed; the book build then executes nothing again."""
    import nbformat
    from jupyter_cache import get_cache

    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "conftest.py").write_text((ROOT / "notebooks" / "conftest.py").read_text())
    ok = _notebook([
        "import ipywidgets as w\nw.IntSlider(value=7)",
        "from IPython.display import clear_output\n"
        "for i in range(3):\n    clear_output(wait=True)\n    print('step', i)",
        "x = 6 * 7\nassert x == 42\nx",
        "out = w.Output()\nwith out:\n    print('inside the widget')\nout",
    ])
    nbformat.write(ok, tmp_path / "notebooks" / "ok.ipynb")
    nbformat.write(_notebook(["raise ValueError('broken on purpose')"]), tmp_path / "notebooks" / "bad.ipynb")
    (tmp_path / "intro.md").write_text("# Tiny book\n")
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: notebooks/ok\n")
    (tmp_path / "_config.yml").write_text(
        "title: t\nonly_build_toc_files: true\nexclude_patterns: [_build]\n"
        "execute:\n  execute_notebooks: cache\n  raise_on_error: true\n  timeout: 120\n")
    env = {k: v for k, v in os.environ.items() if k != "ENGRAM_BOOK_BUILD"}
    run = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "notebooks",
                          "-p", "no:cacheprovider", "-q"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert run.returncode == 1 and "1 failed" in run.stdout and "4 passed" in run.stdout, run.stdout + run.stderr

    cache = get_cache(str(tmp_path / "_build" / ".jupyter_cache"))
    records = cache.list_cache_records()
    assert [Path(r.uri).name for r in records] == ["ok.ipynb"], "only the notebook without errors is stored"
    stored = cache.get_cache_bundle(records[0].pk).nb
    outputs = [c.outputs for c in stored.cells if c.cell_type == "code"]
    assert outputs[1][0]["text"] == "step 2\n", "clear_output is honoured"
    assert outputs[2][0]["data"]["text/plain"] == "42"
    state = stored.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert any(s["model_name"] == "IntSliderModel" and s["state"]["value"] == 7 for s in state.values())
    (output_widget,) = [s["state"] for s in state.values() if s["model_name"] == "OutputModel"]
    assert [o["text"] for o in output_widget["outputs"]] == ["inside the widget\n"], "captured by the Output widget"
    assert all(o["output_type"] != "stream" for o in outputs[3]), "not shown as the cell's own output"
    assert "ok.ipynb" in json.loads((tmp_path / "_build" / "notebook-times.json").read_text())

    jb = str(Path(sys.executable).parent / "jupyter-book")
    build = subprocess.run([jb, "build", str(tmp_path), "-W", "--keep-going"], capture_output=True, text=True)
    log = build.stdout + build.stderr
    assert build.returncode == 0, log[-4000:]
    assert "ok.ipynb: Using cached notebook" in log and "Executing notebook" not in log, log[-4000:]
    page = (tmp_path / "_build" / "html" / "notebooks" / "ok.html").read_text()
    assert "application/vnd.jupyter.widget-state+json" in page and "step 2" in page and "step 1" not in page
