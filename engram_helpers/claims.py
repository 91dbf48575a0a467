"""Claims a notebook makes about its results: asserted where they were measured, reported elsewhere.

A notebook states two kinds of results, and asserts both:

* results about a **method**, which hold for every model (restoring every clean state gives back the clean
  probability; an undone edit leaves the weights bit for bit as they were): plain ``assert``;
* results about **what one model shows at the notebook's sizes** (the MLP effect of SmolLM2 peaks in its
  first layers; the edit wins on 38 of 40 facts): :func:`expect`.

:func:`expect` asserts in the *reference run*, the default model at the sizes the text states. With
another model (``MODEL_NAME`` in the parameters cell, passed to :func:`configure`) or with the reduced
sizes that the test suite uses (environment variable ``ENGRAM_SMALL_RUN=1``) it prints whether the claim
holds there instead of stopping "Run all"::

    claims.configure(MODEL_NAME)
    claims.expect(peak_layer <= 5, "the MLP effect peaks in the first six layers", observed=peak_layer)
"""

from __future__ import annotations

import os

from .models import DEFAULT_MODEL

_STATE = {"model": DEFAULT_MODEL}


class ClaimFailed(AssertionError):
    """A claim of the text does not hold in the reference run."""


def configure(model_name: str) -> None:
    """Tell the claims which model the notebook runs (the ``MODEL_NAME`` of its parameters cell)."""
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"configure() needs the model's name, e.g. claims.configure(MODEL_NAME); got {model_name!r}.")
    _STATE["model"] = model_name


def small_run() -> bool:
    """Whether the notebook runs at the test suite's reduced sizes (``ENGRAM_SMALL_RUN=1``)."""
    return os.environ.get("ENGRAM_SMALL_RUN", "0") not in ("", "0", "false", "False")


def reference_run() -> bool:
    """Whether this is the run the text describes: the default model at the notebook's stated sizes."""
    return _STATE["model"] == DEFAULT_MODEL and not small_run()


def expect(condition: object, message: str, observed: object = None) -> bool:
    """Assert ``condition`` in the reference run; elsewhere print whether it holds. Returns it as a bool.

    ``message`` states the claim as the text makes it; ``observed`` (optional) is printed with it.
    """
    holds = bool(condition)
    seen = "" if observed is None else f" (observed: {observed})"
    if reference_run():
        if not holds:
            raise ClaimFailed(f"{message}{seen}")
        return True
    where = "reduced sizes" if small_run() else _STATE["model"]
    print(f"[claim for the default model, not checked with {where}] {message}: "
          f"{'holds' if holds else 'does NOT hold'} here{seen}")
    return holds
