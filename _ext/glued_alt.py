"""Alt text for the figures a chapter pastes from a notebook (```{glue} KEY with :doc:).

myst-nb renders such a cross-page glue as a bare image with no alt text, so the HTML falls back to the image's
file name (a hash). The chapters follow each pasted figure with its caption paragraph ("... Look at ..."), and
that caption is the figure's description: this post-transform, run after myst-nb has replaced the pending glue
references (its priority 5), copies the caption's text into the image's alt text. Images that have alt text
(every ```{figure}, checked by tests/test_figures.py) are left alone.
"""

from __future__ import annotations

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.transforms.post_transforms import SphinxPostTransform


def add_caption_alt(document: nodes.Node) -> int:
    """Give every image without alt text that is directly followed by a paragraph that paragraph's text as alt.
    Returns how many images it changed."""
    changed = 0
    for image in list(document.findall(nodes.image)):
        parent = image.parent
        if image.get("alt") or parent is None:
            continue
        i = parent.index(image)
        if i + 1 < len(parent) and isinstance(parent[i + 1], nodes.paragraph):
            image["alt"] = " ".join(parent[i + 1].astext().split())
            changed += 1
    return changed


class GluedFigureAlt(SphinxPostTransform):
    default_priority = 6  # after myst_nb.ext.glue.crossref.ReplacePendingGlueReferences (5)

    def run(self, **kwargs) -> None:
        add_caption_alt(self.document)


def setup(app: Sphinx) -> dict:
    app.add_post_transform(GluedFigureAlt)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
