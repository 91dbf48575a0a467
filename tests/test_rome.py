"""engram_helpers.rome: the rank-one update, hyperparameters as data, the key at the template's subject,
the fast value optimization against a plain reference, and a real edit undone bit for bit."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from engram_helpers import data, layer_stats, rome, sweeps, weights
from engram_helpers.hooks import trace
from engram_helpers.models import answer_ids, arch, encode, first_token_id, mlp_out_weight, next_token_probs
from engram_helpers.query import Query, contexts, subject_last


def _problem(seed=0, d_out=6, d_in=9):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    k, v = torch.randn(d_in, generator=g, dtype=torch.float64), torch.randn(d_out, generator=g, dtype=torch.float64)
    A = torch.randn(d_in, 40, generator=g, dtype=torch.float64)
    return W, k, v, A @ A.T / 40


def test_rank_one_update_writes_the_value_and_spares_orthogonal_keys():
    W, k, v, C = _problem()
    delta = rome.rank_one_update(W, k, v, C)
    assert torch.linalg.matrix_rank(delta) == 1
    assert torch.allclose((W + delta) @ k, v, atol=1e-10)
    # keys that are C⁻¹-orthogonal to k (xᵀ C⁻¹ k = 0) are left unchanged
    u = torch.linalg.solve(C, k)
    x = torch.randn(9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x - (x @ u) / (u @ u) * u
    assert torch.allclose(delta @ x, torch.zeros(6, dtype=torch.float64), atol=1e-10)


def test_identity_update_is_hebbian_plus_anti_hebbian():
    W, k, v, _ = _problem(2)
    expected = (rome.hebbian_update(k, v) - torch.outer(W @ k, k)) / (k @ k)
    assert torch.allclose(rome.rank_one_update(W, k, v, None), expected, atol=1e-12)
    assert torch.allclose(rome.hebbian_update(k, v, 0.5), 0.5 * torch.outer(v, k))


def test_rank_one_update_rejects_wrong_shapes():
    W, k, v, C = _problem()
    with pytest.raises(ValueError, match="Shapes"):
        rome.rank_one_update(W, v, k, C)


def test_weight_delta_lands_in_the_weight_and_undoes_exactly(tiny_model):
    W = mlp_out_weight(tiny_model, 1)
    w0 = W.clone()
    dW = torch.randn(W.shape, generator=torch.Generator().manual_seed(0))
    with weights.add(tiny_model, rome.weight_delta(tiny_model, 1, dW)):  # GPT-2's Conv1D is stored transposed
        assert torch.allclose(mlp_out_weight(tiny_model, 1), w0 + dW)
    assert torch.equal(mlp_out_weight(tiny_model, 1), w0)
    with pytest.raises(ValueError, match="shape"):
        rome.weight_delta(tiny_model, 1, dW.T)


class _Named(torch.nn.Module):
    """A stand-in with only a config, for matching hyperparameters by name and architecture."""

    def __init__(self, name: str, model_type: str, n_layers: int):
        super().__init__()
        self.config = type("Config", (), {"_name_or_path": name, "model_type": model_type,
                                          "num_hidden_layers": n_layers})()


def test_hparams_match_model_name_and_architecture():
    for name in ("gpt2-xl", "openai-community/gpt2-xl"):
        hp = rome.hparams_for(_Named(name, "gpt2", 48))
        assert (hp.layer, hp.status, hp.n_prefixes) == (17, "paper", 20), name
    smol_model = _Named("/root/.cache/engram-course/models/smollm2-135m-offline", "llama", 30)
    smol = rome.hparams_for(smol_model)
    for named in (smol_model, _Named("/somewhere/gemma-3-270m-offline", "gemma3_text", 18)):
        hp, sweep = rome.hparams_for(named), sweeps.choosing_sweep(named)
        assert sweep is not None, "a tuned model's layer comes from a committed sweep (scripts/rome_sweep.py)"
        assert (hp.layer, hp.status) == (sweeps.chosen_layer(sweep), "tuned"), "hparams follow the committed sweep"
        assert sweeps.layer_sweep(named) is not None, "every tuned model also has its sweep over the whole depth"
        assert sweep["split"] == "dev" and set(sweep["fact_ids"]) <= {f.id for f in data.facts_in_split("dev")}
        rule = sweep["settings"].get("rule_reference")  # a check under a rule may sweep only the layers in reach
        assert sweep["complete"] and len(sweep["layers"]) >= (2 if rule is not None else 4)
        recorded = sweep["settings"].get("hparams", {})  # the settings it edited with, where recorded
        assert all(getattr(hp, k) == v for k, v in recorded.items() if k not in ("layer", "n_prefixes")), \
            "the settings file keeps the other settings its choosing sweep ran with (e.g. a clamp factor, --set)"
        scores = {int(l): v for l, v in sweep["score"].items()}
        assert max(scores, key=scores.__getitem__) == sweep["best_layer"]
    # the same name on another architecture does not get the paper's settings: the depth rule applies
    for named in (smol_model, _Named("/somewhere/gemma-3-270m-offline", "gemma3_text", 18)):
        fresh = sweeps.layer_sweep(named, variant="fresh")  # the check that settled each layer: new facts only
        used = set(sweeps.layer_sweep(named)["fact_ids"]) | set(sweeps.layer_sweep(named, "spread")["fact_ids"])
        assert fresh is not None and not used & set(fresh["fact_ids"])
        assert len(fresh["settings"]["excluded_sweeps"]) == 2
        assert fresh["settings"]["rule_reference"] in fresh["layers"], "a check names the layer its rule compares with"
    assert sweeps.choosing_sweep(_Named("gpt2-xl", "gpt2", 48)) is None, "the paper's layer, not a sweep's"
    other = rome.hparams_for(_Named("gpt2-xl", "llama", 48))
    assert other.status == "depth rule" and other.layer == max(1, round(48 * smol.layer / 30))
    assert rome.hparams_for(_Named("gpt2-medium", "gpt2", 24)).status == "depth rule"
    with pytest.raises(ValueError, match="Unknown settings"):
        rome.with_settings(smol, layers=3)
    assert rome.with_settings(smol, layer=6).layer == 6
    # the command lines' setting=value (rome_sweep.py --set, rome_speed_settings.py --variants), typed like the setting
    assert rome.setting_from_text("clamp_factor=2", smol) == {"clamp_factor": 2.0}
    assert rome.setting_from_text("v_steps=12", smol) == {"v_steps": 12}
    assert rome.setting_from_text("cov_source=wiki", smol) == {"cov_source": "wiki"}
    for bad, match in (("v_step=12", "setting of rome.HParams"), ("status=x", "setting of rome.HParams"),
                       ("clamp_factor=", "setting of rome.HParams"), ("v_steps=1.5", "whole number"),
                       ("v_lr=fast", "takes a number")):
        with pytest.raises(ValueError, match=match):
            rome.setting_from_text(bad, smol)


def test_prefix_containing_the_subject_does_not_move_the_key(default_model):
    """The key is read at the template's subject, even when a context prefix mentions the subject too."""
    model, tok = default_model
    q = Query("The {} is located in the city of", "Eiffel Tower", "Rome")
    prefix = "I saw the Eiffel Tower at night"
    ctx = q.in_context(prefix)
    text = ctx.prompt
    ids = encode(tok, text)[0]["input_ids"][0]
    pos = subject_last(tok, ctx)
    assert tok.decode(ids[: pos + 1]).endswith("The Eiffel Tower") and pos > len(encode(tok, prefix)[0]["input_ids"][0])
    # the old way, str.find on the filled text, lands in the prefix
    old_char = text.find("Eiffel Tower") + len("Eiffel Tower")
    old_pos = len(tok(text[:old_char], add_special_tokens=False)["input_ids"])  # + encode's prefix token - 1
    assert old_pos < pos, "str.find would have picked the prefix's occurrence"
    layer = 4
    key = rome.compute_key(model, tok, q, layer, [prefix])
    with torch.no_grad(), trace(model, arch(model).mlp_out_name(layer), retain_input=True, stop=True) as t:
        model(**encode(tok, [q.prompt, text])[0])
    at_template = (t.input[0, subject_last(tok, q)] + t.input[1, pos]) / 2
    at_prefix = (t.input[0, subject_last(tok, q)] + t.input[1, old_pos]) / 2
    assert torch.allclose(key, at_template, atol=1e-5)
    assert not torch.allclose(key, at_prefix, atol=1e-2)


def _reference_loss(model, tok, q, prefixes, layer, delta):
    """The value loss's NLL and the KL prompt's log-probabilities by plain full forwards, one context at a time."""
    tgt = answer_ids(tok, q.target)
    nlls = []
    for qq in contexts(q, prefixes) + [Query("{} is a", q.subject)]:
        ids = encode(tok, qq.prompt)[0]["input_ids"][0].tolist()
        n, s = len(ids), subject_last(tok, qq)
        is_kl = qq.template == "{} is a"

        def add(out, s=s):
            out = out.clone()
            out[0, s] = out[0, s] + delta
            return out

        with trace(model, arch(model).mlp_name(layer), retain_output=False, edit_output=add):
            logits = model(input_ids=torch.tensor([ids if is_kl else ids + tgt])).logits[0].float()
        if is_kl:
            kl_logp = torch.log_softmax(logits[n - 1], -1)
        else:
            lp = torch.log_softmax(logits[n - 1:n - 1 + len(tgt)], -1)
            nlls.append(-lp[torch.arange(len(tgt)), torch.tensor(tgt)])
    return torch.stack(nlls).mean(), kl_logp


@pytest.mark.parametrize("target", ["Rome", "Rio de Janeiro"])
def test_fast_value_optimization_matches_plain_forward_passes(default_model, target):
    """compute_value reuses the positions before the subject, replays the layers below the edit, feeds the
    target without its last token and computes few logits: its losses must be those of plain full forward
    passes, at delta = 0 and after one Adam step computed here independently (a one-token and a
    several-token target)."""
    model, tok = default_model
    fact = data.load_facts()[0]
    q = fact.query(target)
    assert len(answer_ids(tok, target)) == (1 if target == "Rome" else 3)
    prefixes = ["I saw the Eiffel Tower", "Because"]  # different lengths: left padding is exercised
    hp = rome.with_settings(rome.hparams_for(model), v_steps=2, nll_stop=-1.0)
    key = rome.compute_key(model, tok, q, hp.layer, prefixes)
    val = rome.compute_value(model, tok, q, key, hp, prefixes)
    d = torch.zeros_like(val.out_init, requires_grad=True)
    with torch.enable_grad():
        nll0, kl0 = _reference_loss(model, tok, q, prefixes, hp.layer, d)
        init = kl0.detach()
        total = nll0 + hp.kl_factor * F.kl_div(init, kl0, log_target=True, reduction="sum") \
            + hp.v_weight_decay * d.norm() / val.out_init.norm() ** 2
        opt = torch.optim.Adam([d], lr=hp.v_lr)
        total.backward()
        opt.step()
    with torch.no_grad():
        if d.norm() > hp.clamp_factor * val.out_init.norm():
            d.mul_(hp.clamp_factor * val.out_init.norm() / d.norm())
        nll1, kl1 = _reference_loss(model, tok, q, prefixes, hp.layer, d)
    assert abs(val.losses[0]["nll"] - nll0.item()) < 1e-4
    assert abs(val.losses[1]["nll"] - nll1.item()) < 1e-3 * max(1.0, nll1.item())
    assert abs(val.losses[1]["kl"] - F.kl_div(init, kl1, log_target=True, reduction="sum").item()) < 1e-3


def test_bad_input_errors_clearly(default_model):
    model, tok = default_model
    with pytest.raises(TypeError, match="takes a Query"):
        rome.apply_rome(model, tok, "The Eiffel Tower is in", C="identity")
    with pytest.raises(ValueError, match="no target"):
        rome.apply_rome(model, tok, Query("The {} is in", "Eiffel Tower"), C="identity")
    with pytest.raises(IndexError, match="layers 0..29"):
        rome.apply_rome(model, tok, Query("The {} is in", "Eiffel Tower", "Rome"),
                        hparams=rome.HParams(layer=30), C="identity")
    with pytest.raises(ValueError, match="layer 3"):
        rome.apply_rome(model, tok, Query("The {} is in", "Eiffel Tower", "Rome"), hparams=rome.HParams(layer=4),
                        C=layer_stats.SecondMoment(torch.eye(1536), 3, 1, "bbc"))


def test_prefixes_are_seeded_and_cached(default_model, tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path))
    model, tok = default_model
    a = rome.context_prefixes(model, tok, n=2, length=4, seed=3)
    files = list((tmp_path / "prefixes").rglob("*.json"))
    assert len(files) == 1
    files[0].unlink()
    assert rome.context_prefixes(model, tok, n=2, length=4, seed=3) == a  # regenerated: same text
    assert len(a) == 2 and all(a)


def test_edit_flips_a_known_fact_and_undo_is_exact(default_model):
    model, tok = default_model
    fact = data.load_facts()[0]  # The Eiffel Tower ... Paris -> Rome
    assert fact in data.known_facts(model, tok, [fact]), "the model should know the Eiffel Tower fact"
    hp = rome.hparams_for(model)
    C = layer_stats.second_moment(model, tok, hp.layer, n_tokens=3000)
    w0 = mlp_out_weight(model, hp.layer).clone()
    cpu = time.process_time()
    change = rome.apply_rome(model, tok, fact.query(fact.target_new), C=C)
    cpu = (time.process_time() - cpu) / max(1, torch.get_num_threads())
    try:
        # CPU seconds per thread, not wall time: other processes on a shared machine must not fail the test
        assert cpu < 15, f"one edit took {cpu:.1f} CPU seconds per thread; it should take a few seconds"
        top = int(next_token_probs(model, tok, fact.prompt).argmax())
        assert top == first_token_id(tok, fact.target_new), tok.decode([top])
        v, k = change.info["value"], change.info["key"]
        assert torch.allclose(mlp_out_weight(model, hp.layer) @ k, v, atol=1e-3 * v.norm())
        assert set(change.info["timings"]) == {"C", "key", "value", "update", "total"}
        assert weights.active_changes(model) == [change]
    finally:
        change.undo()
    assert torch.equal(mlp_out_weight(model, hp.layer), w0)
    assert int(next_token_probs(model, tok, fact.prompt).argmax()) == first_token_id(tok, fact.target_true)
    with rome.edit(model, tok, fact.query(fact.target_new), C=C):
        assert not torch.equal(mlp_out_weight(model, hp.layer), w0)
    assert torch.equal(mlp_out_weight(model, hp.layer), w0)
