"""Checks for the ROME notebook's exercises (``notebooks/rome.ipynb``).

Each check runs the reader's function and the library's reference (:mod:`engram_helpers.rome`) on the
same small inputs and raises :class:`~engram_helpers.checks.CheckFailed` with a hint about the likely
mistake.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import rome, weights
from ..hooks import trace
from ..models import arch, encode
from ..query import Query, contexts, subject_last, subject_span
from . import CheckFailed, assert_close, passed

_CASES = (
    Query("The {} is located in the city of", "Eiffel Tower", "Rome"),
    Query("The mother tongue of {} is", "Danielle Darrieux", "English"),
)
_PREFIXES = ["I saw the Eiffel Tower at night", "I think that"]  # the first prefix contains a subject


def _key_variants(model, tok, query: Query, layer: int, prefixes) -> dict[str, torch.Tensor]:
    """Keys computed the wrong ways a reader might try, to recognise a mistake: name -> [d] tensor."""
    qs = contexts(query, list(prefixes))
    texts = [q.prompt for q in qs]
    last_subj = [subject_last(tok, q) for q in qs]
    last_tok = (encode(tok, texts)[1]).tolist()
    first_subj = [subject_span(tok, q)[0] for q in qs]
    found = []  # the subject searched for in the text (its first occurrence), as str.find would
    for text in texts:
        end = text.find(query.subject) + len(query.subject)
        found.append(len(encode(tok, text[:end])[0]["input_ids"][0]) - 1)
    name = arch(model).mlp_out_name(layer)
    batch, _ = encode(tok, texts)
    with torch.no_grad(), trace(model, name, retain_input=True) as t:
        model(**batch)
    assert t.output is not None and t.input is not None  # both retained, and the forward pass ran
    rows = torch.arange(len(texts))
    return {
        "output": t.output[rows, last_subj].mean(0),
        "no_prefixes": t.input[0, last_subj[0]],
        "last_token": t.input[rows, last_tok].mean(0),
        "first_subject_token": t.input[rows, first_subj].mean(0),
        "searched": t.input[rows, found].mean(0),
        "sum": t.input[rows, last_subj].sum(0),
    }


_KEY_HINTS = {
    "output": "You returned the output of the MLP's output projection ([d_model]); the key is its *input* "
              "(the MLP's hidden activation, [d_mlp]): use trace(..., retain_input=True) and t.input.",
    "no_prefixes": "This is the key of the bare query only. Average over the query AND the query after each "
                   "prefix: contexts(query, prefixes).",
    "last_token": "You read the prompt's last token. The key sits at the subject's LAST token: use "
                  "subject_last(tok, q) for each context query q.",
    "first_subject_token": "You read the subject's first token; ROME uses its last token.",
    "searched": "You searched the text for the subject, and a prefix that mentions it moved the key there. Take "
                "the position from the template's {}: subject_last(tok, q) for each q in contexts(query, prefixes).",
    "sum": "You summed over the contexts; take the mean.",
}


def check_compute_key(fn: Callable, model, tok, layer: int = 3) -> None:
    """Check ``fn(model, tok, query, layer, prefixes) -> [d_mlp]`` against :func:`rome.compute_key`."""
    for query in _CASES:
        expected = rome.compute_key(model, tok, query, layer, _PREFIXES)
        got = fn(model, tok, query, layer, list(_PREFIXES))
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"compute_key returned {type(got).__name__}; return a torch.Tensor of shape [d_mlp].")
        got = got.detach().float().cpu()
        if got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
            continue
        for wrong, value in _key_variants(model, tok, query, layer, _PREFIXES).items():
            if got.shape == value.shape and torch.allclose(got, value.float(), atol=1e-4, rtol=1e-4):
                raise CheckFailed(f"compute_key({query.subject!r}): {_KEY_HINTS[wrong]}")
        assert_close(got, expected, f"compute_key({query.subject!r}, layer {layer})",
                     "The contexts are contexts(query, prefixes). Hook arch(model).mlp_out_name(layer) with "
                     "retain_input=True, encode all their prompts with models.encode, read each row at "
                     "subject_last(tok, q), and average.", atol=1e-4)
    passed("compute_key")


def _small_problem(seed: int = 0, d_out: int = 5, d_in: int = 7):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    k = torch.randn(d_in, generator=g, dtype=torch.float64)
    v = torch.randn(d_out, generator=g, dtype=torch.float64)
    A = torch.randn(d_in, 3 * d_in, generator=g, dtype=torch.float64)
    C = A @ A.T / (3 * d_in) + 0.1 * torch.eye(d_in, dtype=torch.float64)
    return W, k, v, C


def check_rank_one_update(fn: Callable) -> None:
    """Check ``fn(W, k, v, C) -> ΔW`` ([d_out, d_in]) against :func:`rome.rank_one_update`."""
    for seed in range(3):
        W, k, v, C = _small_problem(seed)
        got = fn(W.clone(), k.clone(), v.clone(), C.clone())
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"Return a torch.Tensor ΔW of shape {tuple(W.shape)}, not {type(got).__name__}.")
        if got.shape == W.shape[::-1]:
            raise CheckFailed(f"ΔW has shape {tuple(got.shape)}, the transpose of W's {tuple(W.shape)}: the outer "
                              f"product is (column of size d_out) times (row of size d_in).")
        expected = rome.rank_one_update(W, k, v, C)
        got = got.double()
        if got.shape == expected.shape and torch.allclose(got, expected, atol=1e-8, rtol=1e-6):
            continue
        u = torch.linalg.solve(C, k)
        wrong = {
            "The update ignores C: whiten the key with C⁻¹ (u = torch.linalg.solve(C, k)) in both the outer "
            "product and the denominator.": torch.outer(v - W @ k, k) / (k @ k),
            "You multiplied by C instead of solving with it: u = C⁻¹k is torch.linalg.solve(C, k), not C @ k.":
                torch.outer(v - W @ k, C @ k) / ((C @ k) @ k),
            "The anti-Hebbian term is missing: the residual is v − W k, not v, so that the old value W k is "
            "removed rather than added to.": torch.outer(v, u) / (u @ k),
            "The denominator is missing: divide by kᵀ C⁻¹ k so that (W + ΔW) k = v exactly.": torch.outer(v - W @ k, u),
        }
        for hint, value in wrong.items():
            if got.shape == value.shape and torch.allclose(got, value, atol=1e-8, rtol=1e-6):
                raise CheckFailed(hint)
        if got.shape == W.shape and not torch.allclose((W + got) @ k, v, atol=1e-6):
            raise CheckFailed("(W + ΔW) k should equal v, and it does not: ΔW = (v − W k) (C⁻¹k)ᵀ / (kᵀ C⁻¹ k).")
        assert_close(got, expected, "ΔW", "ΔW = (v − W k) (C⁻¹k)ᵀ / (kᵀ C⁻¹ k).", atol=1e-8, rtol=1e-6)
    passed("rank_one_update")


def check_hebbian_update(fn: Callable) -> None:
    """Check ``fn(k, v, eta) -> η v kᵀ`` ([d_out, d_in]) against :func:`rome.hebbian_update`."""
    for seed in range(3):
        _, k, v, _ = _small_problem(seed)
        eta = 0.5 + seed
        got = fn(k.clone(), v.clone(), eta)
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"Return a torch.Tensor of shape [{len(v)}, {len(k)}], not {type(got).__name__}.")
        expected = rome.hebbian_update(k, v, eta)
        if got.shape == expected.shape[::-1]:
            raise CheckFailed(f"Shape {tuple(got.shape)} is transposed: the weight maps the key (input, d_in="
                              f"{len(k)}) to the value (output, d_out={len(v)}), so ΔW is [d_out, d_in] = v kᵀ.")
        got = got.double()
        if got.shape == expected.shape and torch.allclose(got, torch.outer(v, k), atol=1e-10):
            raise CheckFailed("The learning rate η is missing: ΔW = η v kᵀ.")
        if got.numel() == 1 or got.dim() != 2:
            raise CheckFailed("ΔW must be a matrix: the outer product torch.outer(v, k), not a dot product.")
        assert_close(got, expected, "ΔW", "ΔW = η · torch.outer(v, k).", atol=1e-10)
    passed("hebbian_update")


def check_edit_at_layers(fn: Callable, model, tok) -> None:
    """Check ``fn(model, tok, facts, layers, hparams, Cs) -> {layer: Evaluation}`` (the ★★★ experiment).

    Runs ``fn`` on two development facts at two layers with a short optimization (1 prefix, 3 steps,
    C = identity, so that it takes seconds) and checks: one entry per requested layer; ``"rome"`` rows
    recorded at that layer, one per fact; the scores equal those of the same edits made by the library at
    that layer; every MLP output weight of the model bit for bit as before (restored if not).
    """
    from .. import data, evaluation

    a = arch(model)
    layers = [1, a.n_layers - 2]
    facts = data.facts_in_split("dev")[:2]
    hp = rome.with_settings(rome.hparams_for(model), n_prefixes=1, v_steps=3)
    Cs = {l: "identity" for l in layers}
    params = [model.get_submodule(a.mlp_out_name(l)).weight for l in range(a.n_layers)]
    saved = [p.detach().clone() for p in params]
    before = weights.active_changes(model)
    try:
        got = fn(model, tok, list(facts), list(layers), hp, dict(Cs))
    finally:
        changed = [l for l, (p, s) in enumerate(zip(params, saved)) if not torch.equal(p.detach(), s)]
        for h in reversed(weights.active_changes(model)):  # edits left applied: undone exactly, newest first
            if h not in before:
                h.undo()
        with torch.no_grad():  # anything changed outside the weights registry
            for p, s in zip(params, saved):
                if not torch.equal(p.detach(), s):
                    p.copy_(s)
    if changed:
        raise CheckFailed(f"After your function, the MLP weights of layers {changed} differ from before (restored now "
                          "by the check): undo every edit, e.g. evaluation.evaluate does, or rome.edit(...) as a "
                          "with block, or handle.undo().")
    if not isinstance(got, dict) or sorted(got) != sorted(layers):
        keys = sorted(got) if isinstance(got, dict) else type(got).__name__
        raise CheckFailed(f"Return a dict {{layer: Evaluation}} with one entry per requested layer {layers}; "
                          f"got {keys}.")
    for l in layers:
        e = got[l]
        if not isinstance(e, evaluation.Evaluation) or "rome" not in e.methods:
            raise CheckFailed(f"got[{l}] should be the Evaluation of evaluation.evaluate(...) with method 'rome'.")
        rows = [r for r in e.rows if r["method"] == "rome"]
        if [r["fact"] for r in rows] != [f.id for f in facts]:
            raise CheckFailed(f"At layer {l}: one 'rome' row per fact, in order, expected; got facts "
                              f"{[r['fact'] for r in rows]} for {[f.id for f in facts]}. Pass every fact.")
        if any(r["layer"] != l for r in rows):
            raise CheckFailed(f"The edits for layer {l} were made at layer {rows[0]['layer']}: pass "
                              f"hparams=rome.with_settings(hparams, layer={l}).")
        ref = evaluation.evaluate(model, tok, facts, hparams=rome.with_settings(hp, layer=l), C=Cs[l], unedited=False)
        for m in evaluation.METRICS:
            v = e.values("rome", m)
            if v.shape != (len(facts),):
                raise CheckFailed(f"At layer {l}, {m}: one value per fact expected, shape {v.shape}.")
            if not torch.allclose(torch.tensor(v), torch.tensor(ref.values("rome", m)), atol=1e-4, equal_nan=True):
                raise CheckFailed(f"At layer {l}, {m} differs from an edit made at that layer with Cs[{l}] and the "
                                  "given hparams: use C=Cs[layer], hparams=rome.with_settings(hparams, layer=layer).")
    passed("edit_at_layers")
