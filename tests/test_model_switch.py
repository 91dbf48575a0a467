"""The model switch: each method notebook runs to the end with the second offline model at small sizes.

Marked ``switch`` (``make switch-check``, a CI job of its own). Each run sets ``MODEL_NAME = SECOND_MODEL`` in a
cell injected after the notebook's parameters cell and ``ENGRAM_SMALL_RUN=1``: the claims about the default model
are then printed, not asserted, while the asserts about the method must hold with Gemma-3-270M too. The grafting
notebook uses no language model. Slow (minutes per notebook on one thread; the first run also converts the model
and computes its statistics C).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from nbrun import run_notebook

from engram_helpers.models import SECOND_MODEL

ROOT = Path(__file__).resolve().parents[1]
METHOD_NOTEBOOKS = ["causal_tracing", "rome", "forgetting"]

# Run after the last cell: the switch reached the model the notebook used, and nothing switched it back.
CHECK = f"""
from torch import nn as _nn
_lms = {{type(_v).__name__ for _v in list(globals().values())
        if isinstance(_v, _nn.Module) and hasattr(getattr(_v, "config", None), "vocab_size")}}
assert MODEL_NAME == {SECOND_MODEL!r}, f"a cell set MODEL_NAME back to {{MODEL_NAME!r}}"
assert any(_n.startswith("Gemma3") for _n in _lms), f"no Gemma 3 model among the notebook's variables: {{_lms}}"
assert not any(_n.startswith("Llama") for _n in _lms), f"the default model was loaded as well: {{_lms}}"
"""


@pytest.mark.switch
@pytest.mark.slow
@pytest.mark.parametrize("name", METHOD_NOTEBOOKS)
def test_method_notebook_runs_with_the_second_model(name):
    env = {"ENGRAM_SMALL_RUN": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                os.environ.get("PYTHONPATH")]))}
    run_notebook(ROOT / "notebooks" / f"{name}.ipynb", {"MODEL_NAME": SECOND_MODEL}, env=env, after=CHECK,
                 timeout=1800)
