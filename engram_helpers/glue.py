"""Paste a notebook's values into the book: :func:`glue` uses myst-nb's ``glue`` where it is installed.

Elsewhere (e.g. on Colab) it does nothing, so every notebook runs with or without the book's tools::

    from engram_helpers.glue import glue
    glue("ct_traced", len(facts))
"""

from __future__ import annotations

from typing import Any


def glue(name: str, value: Any, display: bool = False) -> None:
    """Store ``value`` under ``name`` for ``{glue:text}`` roles in the book. Without myst-nb it only shows
    ``value`` when ``display`` is True (e.g. a glued figure on Colab), and stores nothing."""
    if not name or not isinstance(name, str):
        raise ValueError(f"A glue key must be a non-empty string such as 'ct_traced', got {name!r}.")
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        if display:
            from IPython.display import display as show

            show(value)
        return
    myst_glue(name, value, display=display)
