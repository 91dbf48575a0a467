"""The ROME layer sweep that chooses the default layer, and the Hase et al. (2023) analysis.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/rome_sweep.py --threads 1 \
        [--model smollm2-135m-offline] [--step 2 | --layers 0,2,4] [--facts 10] [--split dev] [--spread] \
        [--exclude SWEEP.json ...] [--rule-reference L] [--set clamp_factor=2 ...] \
        [--out engram_helpers/hparams/sweeps/MODEL.json]

Every ``--step``-th layer (or only the ``--layers`` named), ``--facts`` known facts of the DEVELOPMENT split
(``--split``; the layer is chosen here, so never on the test facts the notebook reports; the first known ones, or
with ``--spread`` spread over the relations; ``--exclude`` leaves out the facts of earlier sweeps, for a check on
fresh facts; ``--rule-reference`` records the layer in use when such a check starts, which its best layer replaces
only if it beats it fact by fact: ``sweeps.layer_rule``; ``--set`` changes one of the model's other settings for
the whole sweep, e.g. to choose the layer together with that setting), each edited at each layer (``--prefixes``
context prefixes) and scored with the CounterFact magnitudes; the chosen layer is the one with the largest mean of
efficacy + paraphrase + neighbourhood magnitude (``best_layer`` in the JSON); the MLP causal trace of each fact
(window ``--window`` layers, default 10; 5 noise samples); then, per (fact, layer), the R² of the paraphrase
magnitude on the layer alone (one indicator per layer) and on the layer plus the fact's tracing effect at that
layer, and the correlation of tracing effect and success, with bootstrap 95% intervals over facts (1,000 resamples,
seed 0). Prints a table and writes every number to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from engram_helpers import data, evaluation, layer_stats, rome, sweeps, tracing
from engram_helpers.models import DEFAULT_MODEL, load_model, model_id


def coarse_to_fine(layers: list[int]) -> list[int]:
    """Every other layer of ``layers`` first, then the rest, so that a sweep stopped early is still spread out."""
    return layers[::2] + layers[1::2]


def summarize(args, model, hp, facts, planned: list[int], per_layer: dict, effects_all: np.ndarray,
              seconds: float, threads: int | str) -> dict:
    """The JSON record of the layers done so far (sorted), with the chosen layer and the Hase analysis."""
    layers = sorted(per_layer)
    effects = effects_all[:, layers]
    result = {"model": model_id(model), "split": args.split, "layers": layers, "layers_planned": planned,
              "complete": layers == sorted(planned), "fact_ids": [f.id for f in facts],
              "settings": {"facts": "spread over relations" if args.spread else "first known",
                           "n_prefixes": args.prefixes, "trace_samples": args.samples, "trace_window": args.window,
                           "excluded_sweeps": args.exclude, "rule_reference": args.rule_reference,
                           "threads": threads, "cov_tokens": hp.cov_tokens,
                           "cov_source": hp.cov_source,
                           "v_steps": hp.v_steps, "nll_stop": hp.nll_stop, "changed_settings": args.changes,
                           "hparams": {k: v for k, v in asdict(hp).items()  # the layer is what the sweep varies
                                       if k not in ("status", "layer")}},
              "selection": "largest mean over facts of efficacy_mag + paraphrase_mag + neighbourhood_mag",
              "per_layer": {str(l): per_layer[l] for l in layers},
              "tracing_effect": effects.tolist(), "tracing_effect_all_layers": effects_all.tolist(),
              "seconds": seconds}
    score = {l: float(v.mean()) for l, v in sweeps.fact_totals(result).items()}
    result["score"], result["best_layer"] = {str(l): score[l] for l in layers}, max(layers, key=lambda l: score[l])
    if len(layers) >= 2:
        for outcome in ("paraphrase_mag", "efficacy_mag"):
            result[f"hase_{outcome}"] = sweeps.tracing_predicts_editing(*sweeps.sweep_matrices(result, outcome))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="an offline model (e.g. gemma-3-270m-offline) or a Hub name")
    ap.add_argument("--step", type=int, default=2)
    ap.add_argument("--layers", help="only these layers, comma-separated (e.g. 0,2,4,6): replaces --step")
    ap.add_argument("--exclude", nargs="*", default=[],
                    help="sweep records (JSON) whose facts to leave out, so that a check runs on fresh facts")
    ap.add_argument("--rule-reference", type=int,
                    help="for a check: the layer in use, which the best layer replaces only if it beats it by facts")
    ap.add_argument("--set", nargs="*", default=[], dest="changes", metavar="SETTING=VALUE",
                    help="change the model's settings for the whole sweep (rome.HParams), e.g. clamp_factor=2")
    ap.add_argument("--facts", type=int, default=10)
    ap.add_argument("--prefixes", type=int, default=2)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--window", type=int, default=10, help="the MLP trace's window of layers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--split", default="dev", choices=["dev", "test"])
    ap.add_argument("--spread", action="store_true",
                    help="take the facts spread over the relations (data.spread_over_relations, seed 0), not the first")
    ap.add_argument("--minutes", type=float, default=float("inf"),
                    help="start no new layer after this many minutes, once 4 are done (the JSON records which ran)")
    ap.add_argument("--out", help="the JSON record (default engram_helpers/hparams/sweeps/<model id>.json)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the layers already in --out (same facts and settings) and run only the missing ones")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    args.out = args.out or f"engram_helpers/hparams/sweeps/{model_id(model)}.json"
    hp0 = rome.hparams_for(model)
    try:
        args.changes = {k: v for text in args.changes for k, v in rome.setting_from_text(text, hp0).items()}
    except ValueError as e:
        raise SystemExit(f"--set: {e}") from None
    if {"layer", "n_prefixes"} & set(args.changes):
        raise SystemExit("--set cannot change the layer (use --layers) or n_prefixes (use --prefixes)")
    hp = rome.with_settings(hp0, **args.changes, n_prefixes=args.prefixes)
    n_layers = model.config.num_hidden_layers
    planned = ([int(l) for l in args.layers.split(",")] if args.layers else list(range(0, n_layers, args.step)))
    if not planned or any(not 0 <= l < n_layers for l in planned) or len(set(planned)) < len(planned):
        raise SystemExit(f"--layers must name distinct layers between 0 and {n_layers - 1}, got {args.layers!r}")
    if args.rule_reference is not None and args.rule_reference not in planned:
        raise SystemExit(f"--rule-reference {args.rule_reference} must be among the swept layers {planned}")
    t0 = time.perf_counter()
    Cs = layer_stats.second_moments(model, tok, planned, hp.cov_tokens, hp.cov_source)
    excluded = sweeps.recorded_fact_ids(args.exclude)
    known = [f for f in data.known_facts(model, tok, data.facts_in_split(args.split)) if f.id not in excluded]
    facts = data.spread_over_relations(known, args.facts, seed=0) if args.spread else known[: args.facts]
    print(f"{len(facts)} {args.split} facts x {len(planned)} layers")
    traces = [tracing.trace_fact(model, tok, f.query(), kind="mlp", n_samples=args.samples, window=args.window)
              for f in facts]
    effects_all = np.array([tr.effects[tr.subject_span[1] - 1] for tr in traces])  # [facts, all layers]
    print(f"traces done at {time.perf_counter() - t0:.0f} s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    per_layer: dict[int, dict] = {}
    threads: int | str = args.threads
    if args.resume and Path(args.out).exists():
        old = json.loads(Path(args.out).read_text(encoding="utf-8"))
        same = (old["fact_ids"] == [f.id for f in facts] and old["split"] == args.split
                and old["layers_planned"] == planned and old["settings"]["n_prefixes"] == args.prefixes
                and old["settings"]["trace_samples"] == args.samples
                and old["settings"]["v_steps"] == hp.v_steps and old["settings"]["nll_stop"] == hp.nll_stop
                and old["settings"].get("changed_settings", {}) == args.changes)
        if not same:
            raise SystemExit(f"--resume: {args.out} was made with other facts or settings; run without --resume")
        if not np.allclose(old["tracing_effect_all_layers"], effects_all, atol=1e-4):
            raise SystemExit("--resume: the traces differ from the recorded ones (another library version?)")
        per_layer = {int(l): v for l, v in old["per_layer"].items()}
        t0 -= old["seconds"]  # the record's seconds count every run ...
        if str(old["settings"]["threads"]) != str(args.threads):  # ... and its threads say which runs used how many
            threads = f"{old['settings']['threads']}, then {args.threads}"
        if set(planned) <= set(per_layer):
            raise SystemExit(f"--resume: {args.out} already has every planned layer; nothing to run")
        print(f"resuming: layers {sorted(per_layer)} kept from {args.out}")
    for l in coarse_to_fine(planned):
        if l in per_layer:
            continue
        if len(per_layer) >= 4 and time.perf_counter() - t0 > 60 * args.minutes:
            print(f"time budget of {args.minutes} min spent: stopping before layer {l}")
            break
        ev = evaluation.evaluate_layers(model, tok, facts, [l], hp, Cs)[l]
        per_layer[l] = {m: ev.values("rome", m).tolist() for m in evaluation.METRICS}
        print(f"layer {l:2d} ({time.perf_counter() - t0:.0f} s): "
              + "  ".join(f"{m} {ev.estimate('rome', m)}" for m in evaluation.MAGNITUDES), flush=True)
        result = summarize(args, model, hp, facts, planned, per_layer, effects_all, time.perf_counter() - t0,
                           threads)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    print(f"best layer by the sum of the three magnitudes: {result['best_layer']} (layers {result['layers']})")
    if args.rule_reference is not None:
        print(f"the rule against layer {args.rule_reference}, fact by fact:\n{sweeps.rule_check(result).report()}")
    for outcome in ("paraphrase_mag", "efficacy_mag"):
        h = result.get(f"hase_{outcome}")
        if h:
            print(f"{outcome}: R² layer {h['r2_layer']:.3f} {h['r2_layer_ci']}, layer + tracing {h['r2_both']:.3f} "
                  f"{h['r2_both_ci']}, gain {h['gain']:.3f} {h['gain_ci']}, r {h['r']:.2f} {h['r_ci']}")
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
