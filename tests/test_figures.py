"""book/figures: every diagram is drawn by scripts/make_figures.py and cannot drift from its code; every
chapter shows at least one, with alt text."""

from __future__ import annotations

import re
from pathlib import Path

from by_path import load

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "book" / "figures"
CHAPTERS = ["engram", "formation", "retrieval", "modification", "forgetting", "consolidation", "replication",
            "limits"]


def _make_figures():
    return load("scripts/make_figures.py")


def test_committed_figures_equal_a_fresh_run(tmp_path):
    written = _make_figures().main(tmp_path)
    names = sorted(p.name for p in written)
    assert names == sorted(p.name for p in FIGURES.glob("*.svg")), \
        "book/figures differs from the script's list: run `python scripts/make_figures.py` and commit"
    stale = [n for n in names if (tmp_path / n).read_bytes() != (FIGURES / n).read_bytes()]
    assert not stale, f"{stale} changed: run `python scripts/make_figures.py` and commit the SVGs"
    again = _make_figures().main(tmp_path / "again")
    assert all(p.read_bytes() == (tmp_path / p.name).read_bytes() for p in again), "output is not reproducible"
    assert all(b"<dc:date>" not in p.read_bytes() for p in written), "SVGs must carry no date"


def _figure_blocks(text: str) -> list[tuple[str, str]]:
    """(path, body) of each ```{figure} / :::{figure} block in a MyST page."""
    pattern = re.compile(r"^(```+|:::+)\{figure\}\s*(\S+)\n(.*?)^\1\s*$", re.MULTILINE | re.DOTALL)
    return [(m.group(2), m.group(3)) for m in pattern.finditer(text)]


def test_every_chapter_shows_a_figure_with_alt_text_and_caption():
    used = set()
    for chapter in CHAPTERS:
        page = ROOT / "book" / f"{chapter}.md"
        blocks = _figure_blocks(page.read_text())
        assert blocks, f"{chapter}.md has no {{figure}}"
        for path, body in blocks:
            assert (page.parent / path).exists(), f"{chapter}.md: {path} does not exist (paths are relative)"
            assert re.search(r"^:alt: \S.{20,}", body, re.MULTILINE), f"{chapter}.md: {path} needs :alt: text"
            caption = "\n".join(l for l in body.splitlines() if l.strip() and not l.startswith(":"))
            assert len(caption) > 40, f"{chapter}.md: {path} needs a caption that says what to look at"
            used.add(Path(path).name)
    unused = {p.name for p in FIGURES.glob("*.svg")} - used
    assert not unused, f"figures drawn but not shown in any chapter: {unused}"


# Each chapter that pairs with a method notebook (in _toc.yml) shows that notebook's key result figure.
PAIRED = {"formation": "grafting", "retrieval": "causal_tracing", "modification": "rome", "forgetting": "forgetting",
          "consolidation": "consolidation", "replication": "replication"}


def test_every_paired_chapter_shows_its_notebooks_figure_with_a_caption():
    """A ```{glue} KEY / :doc: ../notebooks/NAME.ipynb block, where the notebook glues KEY, followed by a caption
    paragraph that starts in italics and says what to look at (MyST's {glue} takes no caption option)."""
    block = re.compile(r"^```\{glue\}\s+(\S+)\n:doc: \.\./notebooks/(\S+)\.ipynb\n```\n\n(\*\S.*?)\n\n",
                       re.MULTILINE | re.DOTALL)
    for chapter, notebook in PAIRED.items():
        found = [(key, nb, caption) for key, nb, caption in block.findall((ROOT / "book" / f"{chapter}.md").read_text())
                 if nb == notebook]
        assert found, f"{chapter}.md shows no figure glued from notebooks/{notebook}.ipynb with an italic caption"
        source = (ROOT / "notebooks" / f"{notebook}.ipynb").read_text()
        for key, _, caption in found:
            assert f'glue(\\"{key}\\", fig' in source, f"notebooks/{notebook}.ipynb does not glue a figure as {key!r}"
            assert re.search(r"\b(Look at|look at|Compare)\b", caption), \
                f"{chapter}.md: the caption under {key} should say what to look at"
