"""Draw the chapters' diagrams into book/figures/*.svg, byte-identical on every run.

    python scripts/make_figures.py                 # writes book/figures/
    python scripts/make_figures.py --out /tmp/fig  # somewhere else (tests/test_figures.py compares)

Each figure is a function ``fig_<name>() -> Figure``; :data:`FIGURES` maps the file name to it. The style is
fixed here (:data:`STYLE`); the SVG carries no date and a fixed hash salt, and text stays text
(``svg.fonttype: none``), so the output depends only on this code and the matplotlib version. The diagrams
are schematics: none of them shows measured data, and the ones that could be mistaken for data say so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from engram_helpers import toy_memory as tm  # noqa: E402

STYLE = {
    "svg.hashsalt": "engram-course",
    "svg.fonttype": "none",
    "font.family": "DejaVu Sans",
    "font.size": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.dpi": 100,
}
BLUE, ORANGE, GREEN, RED, PURPLE, GREY = "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#8c8c8c"


def _box(ax, x, y, w, h, text, fc, color="white", fontsize=9, **kw):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=fc, ec="none", **kw))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", color=color, fontsize=fontsize)


def _arrow(ax, start, end, color="black", **kw):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color=color, shrinkA=2,
                                 shrinkB=2, **kw))


def _neurons(ax, x0, y0, active, tagged, lit=None, title=""):
    """A 4×5 grid of cells: active (filled), tagged (green ring), lit (yellow halo)."""
    for i in range(20):
        x, y = x0 + (i % 5) * 0.32, y0 + (i // 5) * 0.32
        if lit is not None and i in lit:
            ax.add_patch(plt.Circle((x, y), 0.15, color="#ffe066", zorder=1))
        ax.add_patch(plt.Circle((x, y), 0.1, fc=ORANGE if i in active else "white", ec="black", lw=0.8, zorder=2))
        if i in tagged:
            ax.add_patch(plt.Circle((x, y), 0.13, fc="none", ec=GREEN, lw=2, zorder=3))
    ax.text(x0 + 0.64, y0 + 1.3, title, ha="center", va="bottom", fontsize=9)


def fig_engram_tagging() -> plt.Figure:
    """Tag the cells active during learning, then reactivate them later (activity-dependent tagging)."""
    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.set(xlim=(0, 10), ylim=(-0.9, 2.9))
    ax.axis("off")
    learning = {1, 4, 7, 12, 18}
    other = {2, 9, 15, 16}
    _neurons(ax, 0.3, 0.6, learning, learning, title="1. learning (tagging window open)\nactive cells get a tag")
    _neurons(ax, 3.6, 0.6, other, learning, title="2. later, another context\nother cells active, tag kept")
    _neurons(ax, 6.9, 0.6, learning, learning, lit=learning,
             title="3. light on the tagged cells\nthe same ensemble active again")
    for x in (2.05, 5.35):
        _arrow(ax, (x, 1.1), (x + 1.3, 1.1))
    ax.text(0.94, 0.1, "fear conditioning in context A", ha="center", fontsize=8.5)
    ax.text(4.24, 0.1, "neutral context B: no freezing", ha="center", fontsize=8.5)
    ax.text(7.54, 0.1, "context B + light: freezing\n(recall without the cue)", ha="center", fontsize=8.5,
            va="top")
    ax.add_patch(plt.Circle((0.45, -0.55), 0.08, fc=ORANGE, ec="black", lw=0.8))
    ax.text(0.6, -0.55, "active now", va="center", fontsize=8)
    ax.add_patch(plt.Circle((2.1, -0.55), 0.1, fc="none", ec=GREEN, lw=2))
    ax.text(2.27, -0.55, "tagged (e.g. channelrhodopsin)", va="center", fontsize=8)
    ax.add_patch(plt.Circle((5.0, -0.55), 0.11, color="#ffe066"))
    ax.text(5.17, -0.55, "driven by light", va="center", fontsize=8)
    ax.text(9.9, -0.85, "schematic", ha="right", fontsize=8, color=GREY, style="italic")
    return fig


def fig_formation_graft() -> plt.Figure:
    """A graft: θ_pre + γ ⊙ (θ_ft − θ_pre), with a sparse binary mask γ over the parameters."""
    rng = np.random.default_rng(0)
    pre = rng.normal(size=(6, 8))
    ft = pre + rng.normal(scale=0.6, size=pre.shape)
    mask = np.zeros(pre.shape)
    mask.flat[rng.choice(pre.size, size=6, replace=False)] = 1
    graft = pre + mask * (ft - pre)
    fig, axes = plt.subplots(1, 4, figsize=(11, 3.0))
    panels = [(pre, "θ_pre: before fine-tuning", "RdBu_r"), (ft, "θ_ft: after fine-tuning", "RdBu_r"),
              (mask, "γ: the graft mask (sparse, 0/1)", "Greys"), (graft, "θ_pre + γ ⊙ (θ_ft − θ_pre)", "RdBu_r")]
    for ax, (m, title, cmap) in zip(axes, panels):
        ax.imshow(m, cmap=cmap, vmin=-2.5 if cmap != "Greys" else 0, vmax=2.5 if cmap != "Greys" else 1.4)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(True)
    for r, c in zip(*np.nonzero(mask)):
        axes[3].add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fc="none", ec=GREEN, lw=2))
    fig.text(0.5, 0.02, "each square is one parameter (schematic). Green: the grafted parameters take their "
             "fine-tuned values; all others keep their pre-trained values.", ha="center", fontsize=8.5)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.85, bottom=0.12, wspace=0.15)
    return fig


def fig_retrieval_tracing() -> plt.Figure:
    """The three runs of causal tracing: clean, subject corrupted, corrupted with one state restored."""
    tokens = ["The", "Eiff", "el", "Tower", "is", "in"]
    subject = {1, 2, 3}
    n_layers = 5
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), sharey=True)
    titles = ["1. clean run", "2. corrupted run:\nnoise on the subject's embeddings",
              "3. restored run: corrupted, but one\nstate copied from the clean run"]
    answers = ["P(Paris) high", "P(Paris) low", "P(Paris) partly back"]
    for ax, title, answer, run in zip(axes, titles, answers, range(3)):
        ax.set(xlim=(-0.8, n_layers + 0.2), ylim=(-1.2, len(tokens) - 0.2), title=title)
        ax.title.set_fontsize(9.5)
        ax.axis("off")
        for t, tok in enumerate(tokens):
            y = len(tokens) - 1 - t
            ax.text(-0.7, y, tok + ("*" if t in subject else ""), va="center", fontsize=9)
            for layer in range(n_layers):
                fc = "#e8e8e8"
                if run > 0 and t in subject and layer == 0:
                    fc = RED
                if run == 2 and t == 3 and layer == 2:
                    fc = BLUE
                ax.add_patch(Rectangle((layer + 0.1, y - 0.35), 0.8, 0.7, fc=fc, ec="white"))
        ax.text(n_layers / 2 + 0.1, -0.95, answer, ha="center", fontsize=9, weight="bold")
        ax.text(n_layers / 2 + 0.1, len(tokens) - 0.45, "layers →", ha="center", fontsize=8, color=GREY)
    _arrow(axes[2], (2.5, 2.4), (2.5, 2.7), color=BLUE)
    fig.text(0.5, 0.01, "red: corrupted by noise; blue: the hidden state restored from the clean run (last subject "
             "token, one layer). The indirect effect of a state is P(answer) in run 3 minus run 2. Schematic.",
             ha="center", fontsize=8.5)
    fig.subplots_adjust(left=0.03, right=0.99, top=0.82, bottom=0.1, wspace=0.1)
    return fig


def fig_modification_kv() -> plt.Figure:
    """An MLP layer read as a key–value memory, and the matrix ROME changes."""
    fig, ax = plt.subplots(figsize=(10, 3.4))
    ax.set(xlim=(0, 10), ylim=(0, 3.4))
    ax.axis("off")
    ax.plot([0.2, 9.8], [2.9, 2.9], color=GREY, lw=6, solid_capstyle="round", alpha=0.5)
    ax.text(0.2, 3.15, "residual stream at the subject's last token (\"Tower\")", fontsize=9, color="dimgrey")
    _box(ax, 0.6, 1.2, 1.6, 0.8, "input\nprojections\n(gate, up)", BLUE)
    _box(ax, 3.0, 1.2, 1.8, 0.8, "key k\n(hidden activation,\nd_mlp numbers)", "#a1c9f4", color="black")
    _box(ax, 5.6, 1.2, 1.7, 0.8, "output projection\nW", ORANGE, zorder=2)
    _box(ax, 8.0, 1.2, 1.6, 0.8, "value W k\n(d_model numbers)", "#ffb482", color="black")
    _arrow(ax, (1.4, 2.85), (1.4, 2.0))
    _arrow(ax, (2.2, 1.6), (3.0, 1.6))
    _arrow(ax, (4.8, 1.6), (5.6, 1.6))
    _arrow(ax, (7.3, 1.6), (8.0, 1.6))
    _arrow(ax, (8.8, 2.0), (8.8, 2.85))
    ax.text(8.95, 2.4, "added back", fontsize=8, color="dimgrey")
    ax.add_patch(FancyBboxPatch((5.45, 0.95), 2.0, 1.3, boxstyle="round,pad=0.03", fc="none", ec=RED, lw=2,
                                ls="--"))
    ax.text(6.45, 0.55, "ROME writes here: W ← W + ΔW, one rank-one change,\nso that the key k* of the subject "
            "returns a new value v*", ha="center", va="center", fontsize=9, color=RED)
    return fig


def fig_modification_rank_one() -> plt.Figure:
    """The rank-one update's geometry in the toy memory: which keys each exact write leaves untouched."""
    mem = tm.make_memory(seed=0)
    k = tm.unit_key(70.0, length=1.4)
    v = np.array([-1.0, 1.0])
    import torch

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.3))
    for ax, rule in zip(axes, ("delta", "whitened")):
        dW = tm.update(rule, mem.W, k, torch.tensor(v), mem.C)
        u = tm.write_direction(dW)
        u = u if float(u @ k) > 0 else -u
        dist = tm.disturbance(dW, mem.keys).numpy()
        sc = ax.scatter(*mem.keys.numpy().T, c=dist, cmap="viridis", s=10, vmin=0, vmax=3)
        lim = 2.6
        ax.plot([-lim * u[1], lim * u[1]], [lim * u[0], -lim * u[0]], ls="--", color=GREEN)
        _arrow(ax, (0, 0), tuple((1.6 * u).tolist()), color=GREEN, lw=1.5)
        _arrow(ax, (0, 0), tuple(k.tolist()), color=RED, lw=2)
        ax.text(*(k * 1.08).tolist(), "k*", color=RED, fontsize=10)
        ax.text(*(1.7 * u).tolist(), "k*" if rule == "delta" else "C⁻¹k*", color=GREEN, fontsize=10)
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[])
        name = "delta rule: ΔW reads along k*" if rule == "delta" else "ROME: ΔW reads along C⁻¹k*"
        ax.set_title(f"{name}\nmean sq. disturbance of the keys {tm.mean_sq_disturbance(dW, mem.keys):.2f}",
                     fontsize=9.5)
    fig.colorbar(sc, ax=axes, shrink=0.8, label="‖ΔW kᵢ‖: how far each key's recall moves")
    fig.text(0.02, 0.02, "200 toy keys (seed 0), common along 30°; dashed: keys left untouched. "
             "Both writes make k* recall v* exactly.", fontsize=8.5)
    return fig


def fig_forgetting_lashley() -> plt.Figure:
    """Lashley's two principles as a schematic: error grows with the amount removed, not with the place."""
    fig, ax = plt.subplots(figsize=(6.8, 4.0))
    x = np.linspace(0, 60, 100)
    ax.plot(x, 10 + 2.2 * x + 0.02 * x ** 2, color=BLUE, lw=2, label="mass action: error grows with the amount removed")
    rng = np.random.default_rng(1)
    sizes = np.repeat([10, 25, 40, 55], 3)
    places = np.tile([0, 1, 2], 4)
    markers = ["o", "s", "^"]
    for p in range(3):
        s = sizes[places == p]
        y = 10 + 2.2 * s + 0.02 * s ** 2 + rng.normal(scale=6, size=s.size)
        ax.scatter(s, y, marker=markers[p], color=ORANGE, edgecolor="black", zorder=3,
                   label="same size at three different places:\nsimilar error (equipotentiality)" if p == 0 else None)
    ax.step([0, 30, 30, 60], [15, 15, 170, 170], where="post", ls=":", color=GREY,
            label="if the memory sat in one place\n(error jumps when that place is hit)")
    ax.set(xlabel="cortex removed (% of the total)", ylabel="errors while relearning the maze", xlim=(0, 62),
           yticks=[])
    ax.legend(fontsize=7.5, loc="upper left", frameon=False)
    ax.text(61, 5, "SCHEMATIC, not Lashley's data", ha="right", fontsize=9, color=RED, weight="bold")
    fig.tight_layout()
    return fig


def fig_limits_evidence() -> plt.Figure:
    """What each kind of experiment can show, in the brain and in a model."""
    rows = [("necessary?", "remove it: does recall fail?", "lesion, or silencing\n(e.g. optogenetic)",
             "ablate neurons,\nerase a fact, lesion weights"),
            ("sufficient?", "drive or restore it:\ndoes recall come back?", "light on tagged cells",
             "restore a state\n(causal tracing)"),
            ("where to change it?", "write there: does the\nmemory change as intended?",
             "co-activation,\nreconsolidation", "rank-one edit (ROME)")]
    fig, ax = plt.subplots(figsize=(10, 3.4))
    ax.set(xlim=(0, 10), ylim=(0, 4))
    ax.axis("off")
    for x, head in ((0.1, "question"), (2.3, "test"), (4.9, "in the brain"), (7.6, "in a model")):
        ax.text(x, 3.7, head, fontsize=10, weight="bold")
    for r, (q, test, brain, model) in enumerate(rows):
        y = 2.75 - r * 1.1
        _box(ax, 0.1, y - 0.35, 2.0, 0.7, q, [PURPLE, BLUE, ORANGE][r], fontsize=9.5)
        ax.text(2.3, y, test, va="center", fontsize=9)
        ax.text(4.9, y, brain, va="center", fontsize=9)
        ax.text(7.6, y, model, va="center", fontsize=9)
    ax.text(9.9, 0.05, "each answers its own question: a site can pass one test and fail another",
            ha="right", fontsize=8.5, color=GREY, style="italic")
    return fig


def fig_consolidation_memit() -> plt.Figure:
    """Two stores in the brain; one fact at a time (sequential ROME) against a batch over layers (MEMIT)."""
    fig, ax = plt.subplots(figsize=(12, 4.0))
    ax.set(xlim=(0, 15), ylim=(0, 5))
    ax.axis("off")
    # (a) complementary learning systems
    ax.text(0.1, 4.7, "a. brain: two learning systems", fontsize=10, weight="bold")
    _box(ax, 0.3, 3.1, 2.1, 0.8, "hippocampus\nfast, sparse codes", PURPLE)
    _box(ax, 0.3, 0.9, 2.1, 0.8, "neocortex\nslow, shared weights", BLUE)
    _arrow(ax, (0.9, 3.1), (0.9, 1.7))
    ax.text(1.05, 2.55, "replay, new items\ninterleaved with old", fontsize=8.5)
    ax.text(0.3, 4.15, "new experience: stored at once", fontsize=8.5, color="dimgrey")
    ax.text(0.3, 0.45, "learns slowly, without\noverwriting what it knows", fontsize=8.5, color="dimgrey")
    ax.plot([3.9, 3.9], [0.2, 4.8], color=GREY, lw=0.8)
    # (b) sequential ROME
    ax.text(4.1, 4.7, "b. model: sequential ROME", fontsize=10, weight="bold")
    layer = FancyBboxPatch((7.0, 0.6), 1.5, 3.5, boxstyle="round,pad=0.03", fc="#fde3cf", ec=ORANGE, lw=1.5)
    ax.add_patch(layer)
    ax.text(7.75, 4.3, "one layer's W", ha="center", fontsize=9)
    for i, (fact, dw) in enumerate((("fact 1", "ΔW₁"), ("fact 2", "ΔW₂"), ("fact 3", "ΔW₃"), ("…", "…"))):
        y = 3.5 - i * 0.85
        ax.text(4.3, y, fact, va="center", fontsize=9)
        if fact != "…":
            _arrow(ax, (5.0, y), (6.95, y), color=ORANGE)
        ax.text(7.75, y, dw, ha="center", va="center", fontsize=9)
    ax.text(4.3, 0.25, "each edit is solved for its own key alone, on the\nmatrix the earlier edits left: their "
            "side effects add up", fontsize=8.5, color="dimgrey")
    ax.plot([9.0, 9.0], [0.2, 4.8], color=GREY, lw=0.8)
    # (c) MEMIT
    ax.text(9.2, 4.7, "c. model: MEMIT", fontsize=10, weight="bold")
    _box(ax, 9.3, 2.0, 1.7, 1.2, "facts 1…N\nkeys K,\nwhat is still\nmissing R", GREEN, fontsize=8.5)
    for i, label in enumerate(("lowest critical layer", "next layer up", "…", "highest: target set here")):
        y = 0.7 + i * 0.85
        _box(ax, 12.0, y, 2.8, 0.65, label, "#ffb482" if i < 3 else ORANGE, color="black", fontsize=8.5)
        _arrow(ax, (11.0, 2.6), (12.0, y + 0.32), color=GREEN)
    ax.text(9.3, 1.55, "per layer, one solve for all N:\nΔW = R Kᵀ (λC + K Kᵀ)⁻¹", fontsize=8.5)
    ax.text(9.3, 0.25, "going up the range, each layer writes a share of\nwhat the layers below left missing",
            fontsize=8.5, color="dimgrey")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.98, bottom=0.02)
    return fig


def fig_replication_depth() -> plt.Figure:
    """Comparing two models: layers compared by relative depth, and the three choices of the chapter."""
    fig, ax = plt.subplots(figsize=(11, 3.8))
    ax.set(xlim=(0, 11.5), ylim=(-0.45, 4.2))
    ax.axis("off")
    ax.text(0.1, 3.95, "a. layers compared by relative depth", fontsize=10, weight="bold")
    for x, n, name, colour in ((0.9, 30, "model A\n30 layers", BLUE), (2.6, 18, "model B\n18 layers", ORANGE)):
        h = 3.2 / n
        for i in range(n):
            ax.add_patch(Rectangle((x, 0.3 + i * h), 0.8, h * 0.8, fc=colour, ec="none", alpha=0.75))
        ax.text(x + 0.4, -0.05, name, ha="center", va="top", fontsize=8.5)
    for depth, label in ((0.0, "0"), (0.5, "0.5"), (1.0, "1")):
        ax.text(0.75, 0.3 + 3.2 * depth, label, ha="right", va="center", fontsize=8.5)
    ax.text(0.12, 1.9, "relative\ndepth", ha="center", va="center", fontsize=8.5, rotation=90)
    ax.plot([0.8, 3.5], [1.9, 1.9], color=RED, ls="--", lw=1.2)
    ax.text(3.6, 1.9, "depth 0.5 = layer 15 of 30\n= layer 9 of 18", va="center", fontsize=8.5, color=RED)
    ax.plot([5.6, 5.6], [-0.3, 4.1], color=GREY, lw=0.8)
    ax.text(5.8, 3.95, "b. three choices that make the comparison fair", fontsize=10, weight="bold")
    choices = [("same facts", "only facts that both models know\nare traced and edited", GREEN),
               ("same relative depth", "curves against layer ÷ number of layers;\nthe tracing window scaled "
                                       "to each depth", RED),
               ("same statistics", "stated numbers of facts and samples,\n95% bootstrap intervals over facts",
                PURPLE)]
    for i, (head, text, colour) in enumerate(choices):
        y = 2.75 - i * 1.2
        _box(ax, 5.9, y, 1.9, 0.75, head, colour, fontsize=9)
        ax.text(8.0, y + 0.37, text, va="center", fontsize=8.5)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.98, bottom=0.02)
    return fig


FIGURES: dict[str, Callable[[], plt.Figure]] = {
    "engram_tagging.svg": fig_engram_tagging,
    "formation_graft.svg": fig_formation_graft,
    "retrieval_tracing.svg": fig_retrieval_tracing,
    "modification_kv_memory.svg": fig_modification_kv,
    "modification_rank_one.svg": fig_modification_rank_one,
    "forgetting_lashley.svg": fig_forgetting_lashley,
    "limits_evidence.svg": fig_limits_evidence,
    "consolidation_memit.svg": fig_consolidation_memit,
    "replication_depth.svg": fig_replication_depth,
}


def main(out: Path = ROOT / "book" / "figures") -> list[Path]:
    """Write every figure of :data:`FIGURES` to ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with plt.rc_context(STYLE):
        for name, make in FIGURES.items():
            fig = make()
            path = out / name
            fig.savefig(path, format="svg", metadata={"Date": None, "Creator": None})
            plt.close(fig)
            written.append(path)
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "book" / "figures")
    for p in main(parser.parse_args().out):
        print(p)
