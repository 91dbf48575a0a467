"""_ext/glued_alt.py: a figure pasted from a notebook gets its caption as alt text; other images are left alone."""

from __future__ import annotations

from pathlib import Path

from by_path import load
from docutils import nodes
from docutils.frontend import get_default_settings
from docutils.parsers.rst import Parser
from docutils.utils import new_document

ROOT = Path(__file__).resolve().parents[1]
glued_alt = load("_ext/glued_alt.py")


def _document():
    doc = new_document("test", get_default_settings(Parser))
    section = nodes.section()
    doc += section
    pasted = nodes.image(uri="../_images/3f2a.png")              # what myst-nb leaves for a cross-page glue
    caption = nodes.paragraph(text="The comparison of the notebook.  Look at\nthe bands.")
    described = nodes.image(uri="figures/x.svg", alt="A described diagram")
    alone = nodes.image(uri="../_images/ab12.png")                # no paragraph after it
    section += [pasted, caption, described, nodes.paragraph(text="Text after a figure."), nodes.bullet_list(),
                alone]
    return doc, pasted, described, alone


def test_pasted_figure_takes_its_caption_as_alt():
    doc, pasted, described, alone = _document()
    assert glued_alt.add_caption_alt(doc) == 1
    assert pasted["alt"] == "The comparison of the notebook. Look at the bands."
    assert described["alt"] == "A described diagram", "an image with alt text keeps it"
    assert "alt" not in alone, "no caption paragraph, nothing to copy"


def test_registered_after_myst_nb_pastes_the_glue():
    from myst_nb.ext.glue.crossref import ReplacePendingGlueReferences

    assert glued_alt.GluedFigureAlt.default_priority > ReplacePendingGlueReferences.default_priority
    config = (ROOT / "_config.yml").read_text()
    assert "local_extensions:\n    glued_alt: _ext" in config
