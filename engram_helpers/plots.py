"""Shared plotting helpers (matplotlib). Each function draws on ``ax`` (a new figure if ``None``) and returns it."""

from __future__ import annotations

import numpy as np

KIND_STYLE = {
    # kind: (colour map, what one column restores)
    "layer": ("Purples", "single restored layer"),
    "mlp": ("Greens", "centre of {w} restored MLP layers"),
    "attn": ("Reds", "centre of {w} restored attention layers"),
}
KIND_NAME = {"layer": "hidden states", "mlp": "MLP outputs", "attn": "attention outputs"}


def _axes(ax, figsize):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=figsize)
    return ax


def trace_heatmap(result, ax=None):
    """Heatmap of a :class:`engram_helpers.tracing.TraceResult`: tokens down, layers across.

    The colour scale starts at the corrupted probability (no effect) as in the paper; subject tokens are
    marked with ``*``.
    """
    ax = _axes(ax, (6.4, 0.32 * len(result.tokens) + 1.4))
    cmap, xlabel = KIND_STYLE[result.kind]
    img = ax.imshow(result.scores, cmap=cmap, aspect="auto", interpolation="nearest",
                    vmin=min(result.corrupted_prob, float(result.scores.min())),
                    vmax=max(result.clean_prob, float(result.scores.max())))
    ax.set_yticks(range(len(result.tokens)), result.labels())
    step = 5 if result.n_layers <= 40 else 10
    ax.set_xticks(range(0, result.n_layers, step))
    ax.set_xlabel(xlabel.format(w=result.window))
    ax.set_title(f"Restoring {KIND_NAME[result.kind]} after corrupting the subject", fontsize=10)
    cbar = ax.figure.colorbar(img, ax=ax)
    cbar.set_label(f"p({result.target.strip()})")
    return ax


def effect_lines(avg, ax=None):
    """Lines of an :class:`engram_helpers.tracing.AverageEffects`: average indirect effect by layer, one
    line per token category (n facts in the legend), bootstrap 95% intervals shaded, N in the title.
    ``avg.share``: the y-axis is the share of each fact's total effect."""
    ax = _axes(ax, (6.4, 3.6))
    layers = np.arange(avg.mean.shape[1])
    for i, name in enumerate(avg.categories):
        if avg.counts[i] == 0:
            continue
        line, = ax.plot(layers, avg.mean[i], label=f"{name} (n={avg.counts[i]})")
        ax.fill_between(layers, avg.low[i], avg.high[i], color=line.get_color(), alpha=0.15)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel(KIND_STYLE[avg.kind][1].format(w=avg.window))
    ax.set_ylabel("share of the total effect" if avg.share else "average indirect effect")
    ax.set_title(f"{KIND_NAME[avg.kind].capitalize()}: average over N = {avg.n_facts} facts (95% bootstrap)",
                 fontsize=10)
    ax.legend(fontsize=7)
    return ax
