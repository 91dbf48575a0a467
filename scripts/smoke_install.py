"""Smoke test of an installed engram_helpers: what a user does first, at small sizes (about a minute on a CPU).

    cd /somewhere/else && python /path/to/scripts/smoke_install.py

Run it from a folder outside the checkout, so that the installed package is imported, not the source tree.
It loads the facts (package data), the default model, traces one fact, makes one ROME edit and undoes it
(the weights must come back bit for bit). tests/test_packaging.py runs it in a fresh virtual environment
holding the built wheel; the Colab rehearsal runs it too. Exit status 0 when everything holds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import engram_helpers
from engram_helpers import data, rome, tracing
from engram_helpers.models import load_model

torch.set_num_threads(1)
torch.manual_seed(0)
where = Path(engram_helpers.__file__).resolve().parent
print(f"engram_helpers {engram_helpers.__version__} from {where}")
if (where.parent / ".git").exists():
    sys.exit(f"{where} is a source checkout: run this script from a folder outside the checkout")

facts = data.load_facts()
assert len(facts) > 10, f"only {len(facts)} facts: is facts.json in the package?"
model, tok = load_model()
fact = facts[0]
result = tracing.trace_fact(model, tok, fact.query(), kind="layer", n_samples=2)
print(f"traced {fact.prompt!r}: {type(result).__name__}")

hp = rome.with_settings(rome.hparams_for(model), v_steps=3, n_prefixes=2, prefix_len=5)
before = {name: p.detach().clone() for name, p in model.named_parameters()}
handle = rome.apply_rome(model, tok, fact.query(fact.target_new), hparams=hp, C="identity")
changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
assert len(changed) == 1, f"one ROME edit must change exactly one weight matrix, changed {changed}"
handle.undo()
restored = all(torch.equal(p, before[name]) for name, p in model.named_parameters())
assert restored, "undo did not restore the weights bit for bit"
print(f"edited {changed[0]} and undid the edit exactly")
print("smoke test passed")
