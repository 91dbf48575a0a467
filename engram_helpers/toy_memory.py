"""A toy linear associative memory: the three ways of writing one new association that the ROME chapter
compares, small enough to draw.

A memory is a matrix ``W`` of shape ``[d_v, d_k]``: a key ``k`` (``[d_k]``) recalls the value ``W k``
(``[d_v]``). To make a new key ``k`` recall a new value ``v``, add one of three rank-one changes:

- :func:`hebbian_update`, ``ΔW = v kᵀ / (kᵀk)``: Hebb's outer product, scaled so that ``k`` gains exactly
  ``v``; the old recall ``W k`` stays in the output.
- :func:`delta_update`, ``ΔW = (v − W k) kᵀ / (kᵀk)``: the error-driven delta rule (Widrow–Hoff); after it
  ``k`` recalls ``v`` exactly. Every other key ``kᵢ`` moves by ``(v − W k)(kᵀkᵢ)/(kᵀk)``: by an amount
  proportional to its component along ``k``.
- :func:`whitened_update`, ``ΔW = (v − W k)(C⁻¹k)ᵀ / (kᵀC⁻¹k)``, ROME's form, with ``C = E[k kᵀ]`` over the
  keys the data produces (:func:`key_statistics`). It also writes ``v`` exactly, and among all changes that
  do, it has the smallest mean squared disturbance ``E‖ΔW kᵢ‖²`` over those keys.

:func:`make_memory` builds the seeded example of the notebook ``notebooks/toy_memory.ipynb``;
:func:`plot_write` draws one write in key space and value space; :func:`toy_explorer` is its interactive
version (ipywidgets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ToyMemory:
    """A seeded toy memory.

    ``W``: ``[d_v, d_k]``; ``keys``: ``[n, d_k]`` keys as the data produces them (the first ``n_stored``
    are the labelled stored pairs); ``C``: ``[d_k, d_k]``, their second moment ``E[k kᵀ]``.
    """

    W: torch.Tensor
    keys: torch.Tensor
    C: torch.Tensor
    n_stored: int

    @property
    def stored_keys(self) -> torch.Tensor:
        """The labelled stored keys, ``[n_stored, d_k]``."""
        return self.keys[: self.n_stored]


def _check_vector(x: torch.Tensor, size: int, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.shape[0] != size:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 1-D tensor of size {size} to match W; got {shape}.")


def _check_write(W: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError("W must be a 2-D tensor [d_v, d_k] (values × keys).")
    _check_vector(k, W.shape[1], "the key k")
    _check_vector(v, W.shape[0], "the value v")
    if float(k @ k) == 0.0:
        raise ValueError("the key k is zero: a zero key cannot be written; choose a non-zero key.")


def key_statistics(keys: torch.Tensor) -> torch.Tensor:
    """``C = E[k kᵀ]`` (not centred, as in ROME) over ``keys`` ``[n, d_k]``; returns ``[d_k, d_k]``."""
    if keys.dim() != 2 or keys.shape[0] < keys.shape[1]:
        raise ValueError(f"keys must be [n, d_k] with n ≥ d_k so that C is invertible; got {tuple(keys.shape)}.")
    return keys.T @ keys / keys.shape[0]


def make_memory(n_keys: int = 200, n_stored: int = 6, d: int = 2, spread: tuple[float, ...] = (1.0, 0.25),
                angle_deg: float = 30.0, seed: int = 0) -> ToyMemory:
    """The notebook's example: ``n_keys`` keys ``[n_keys, d]`` drawn from a zero-mean Gaussian whose
    standard deviations are ``spread`` (padded with its last entry up to ``d``), rotated by ``angle_deg``
    in the first two coordinates, so that keys are common along one direction and rare across it; a random
    orthogonal memory ``W`` ``[d, d]`` (values are turned keys, so both spaces look alike); and ``C`` from the keys.
    All draws come from ``torch.Generator().manual_seed(seed)``.
    """
    if d < 2 or n_keys < d or not 0 < n_stored <= n_keys:
        raise ValueError("make_memory needs d ≥ 2, n_keys ≥ d and 0 < n_stored ≤ n_keys.")
    gen = torch.Generator().manual_seed(seed)
    sd = torch.tensor([*spread, *[spread[-1]] * max(0, d - len(spread))][:d], dtype=torch.float64)
    z = torch.randn(n_keys, d, generator=gen, dtype=torch.float64) * sd
    a = math.radians(angle_deg)
    R = torch.eye(d, dtype=torch.float64)
    R[:2, :2] = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
    keys = z @ R.T
    W, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))  # a random rotation
    return ToyMemory(W=W, keys=keys, C=key_statistics(keys), n_stored=n_stored)


def unit_key(angle_deg: float, length: float = 1.0, d: int = 2) -> torch.Tensor:
    """A key ``[d]`` of the given length at ``angle_deg`` in the plane of the first two coordinates."""
    a = math.radians(angle_deg)
    k = torch.zeros(d, dtype=torch.float64)
    k[0], k[1] = length * math.cos(a), length * math.sin(a)
    return k


def recall(W: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Values recalled by ``keys`` ``[n, d_k]`` (or one key ``[d_k]``): ``[n, d_v]`` (or ``[d_v]``)."""
    return keys @ W.T


def hebbian_update(W: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Hebb's outer product ``ΔW = v kᵀ / (kᵀk)`` ``[d_v, d_k]``: ``k`` then recalls ``W k + v``."""
    _check_write(W, k, v)
    return torch.outer(v, k) / (k @ k)


def delta_update(W: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The delta rule ``ΔW = (v − W k) kᵀ / (kᵀk)`` ``[d_v, d_k]``: ``k`` then recalls ``v`` exactly."""
    _check_write(W, k, v)
    return torch.outer(v - W @ k, k) / (k @ k)


def whitened_update(W: torch.Tensor, k: torch.Tensor, v: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """ROME's update ``ΔW = (v − W k)(C⁻¹k)ᵀ / (kᵀC⁻¹k)`` ``[d_v, d_k]``; ``C`` ``[d_k, d_k]`` = E[k kᵀ]."""
    _check_write(W, k, v)
    if not isinstance(C, torch.Tensor) or C.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"C must be [d_k, d_k] = {(W.shape[1], W.shape[1])}: use key_statistics(keys).")
    c_inv_k = torch.linalg.solve(C, k)
    return torch.outer(v - W @ k, c_inv_k) / (k @ c_inv_k)


UPDATES: dict[str, str] = {
    "hebbian": "Hebbian outer product",
    "delta": "delta rule",
    "whitened": "whitened by C⁻¹ (ROME)",
}
"""The three write rules, with the labels the figures use."""


def update(rule: str, W: torch.Tensor, k: torch.Tensor, v: torch.Tensor, C: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``ΔW`` ``[d_v, d_k]`` of the rule named ``rule`` (a key of :data:`UPDATES`)."""
    if rule == "hebbian":
        return hebbian_update(W, k, v)
    if rule == "delta":
        return delta_update(W, k, v)
    if rule == "whitened":
        if C is None:
            raise ValueError("the whitened rule needs C: pass C=key_statistics(keys).")
        return whitened_update(W, k, v, C)
    raise ValueError(f"unknown rule {rule!r}: choose one of {list(UPDATES)}.")


def write_direction(dW: torch.Tensor) -> torch.Tensor:
    """The unit key direction ``[d_k]`` that a rank-one ``ΔW`` reads: keys orthogonal to it are untouched."""
    _, s, vh = torch.linalg.svd(dW)
    if s.numel() > 1 and float(s[1]) > 1e-9 * float(s[0]):
        raise ValueError("ΔW is not rank one: write_direction needs one of this module's updates.")
    return vh[0]


def disturbance(dW: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """How far each key's recall moves, ``‖ΔW kᵢ‖`` for ``keys`` ``[n, d_k]``: ``[n]``."""
    return (keys @ dW.T).norm(dim=-1)


def mean_sq_disturbance(dW: torch.Tensor, keys: torch.Tensor) -> float:
    """``mean ‖ΔW kᵢ‖²`` over ``keys`` ``[n, d_k]``; with ``C`` from the same keys it equals ``tr(ΔW C ΔWᵀ)``."""
    return float((disturbance(dW, keys) ** 2).mean())


def write_error(W: torch.Tensor, dW: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    """``‖(W + ΔW) k − v‖``: how far the new key's recall is from the value that was to be written."""
    return float(((W + dW) @ k - v).norm())


# ----------------------------------------------------------------------------------------------------------
# Drawing.


def plot_write(mem: ToyMemory, k: torch.Tensor, v: torch.Tensor, rule: str, axes=None):
    """Draw one write of ``k → v`` with ``rule`` into ``mem`` (2-D keys and values).

    Left: key space, the data's keys (grey), the stored keys (labelled), the new key, the direction the
    update reads and the line of keys it leaves untouched. Right: value space, each stored key's recall
    before (open) and after (filled) the write, the new key's recall and the target ``v`` (star).
    Returns the figure.
    """
    import matplotlib.pyplot as plt

    if mem.W.shape != (2, 2):
        raise ValueError("plot_write draws 2-D memories only: use make_memory(d=2).")
    dW = update(rule, mem.W, k, v, mem.C)
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.4))
    else:
        fig = axes[0].figure
    ax_k, ax_v = axes
    labels = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    ax_k.scatter(*mem.keys.T, s=6, color="0.8", label="keys in the data")
    ax_k.scatter(*mem.stored_keys.T, s=30, color="tab:blue", zorder=3, label="stored keys")
    for i, key in enumerate(mem.stored_keys):
        ax_k.annotate(labels[i % 26], key.tolist(), textcoords="offset points", xytext=(4, 4), color="tab:blue")
    u = write_direction(dW)
    u = u if float(u @ k) > 0 else -u
    lim = 1.15 * float(mem.keys.abs().max())
    ax_k.plot([-lim * u[1], lim * u[1]], [lim * u[0], -lim * u[0]], ls="--", color="tab:green",
              label="keys left untouched")
    ax_k.annotate("", xy=(1.5 * u * k.norm()).tolist(), xytext=(0, 0),
                  arrowprops=dict(arrowstyle="-|>", color="tab:green", lw=1.5))
    ax_k.annotate("", xy=k.tolist(), xytext=(0, 0), arrowprops=dict(arrowstyle="-|>", color="tab:red", lw=2))
    ax_k.plot([], [], color="tab:red", lw=2, label="new key k")
    ax_k.plot([], [], color="tab:green", lw=1.5, label="direction ΔW reads")
    ax_k.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title="key space", xlabel="$k_1$", ylabel="$k_2$")
    ax_k.legend(fontsize=7, loc="lower right")

    before, after = recall(mem.W, mem.stored_keys), recall(mem.W + dW, mem.stored_keys)
    for i, (b, a) in enumerate(zip(before, after)):
        ax_v.annotate("", xy=a.tolist(), xytext=b.tolist(), arrowprops=dict(arrowstyle="-|>", color="tab:blue"))
        ax_v.annotate(labels[i % 26], a.tolist(), textcoords="offset points", xytext=(4, 4), color="tab:blue")
    ax_v.scatter(*before.T, s=30, facecolor="none", edgecolor="tab:blue", label="stored recall before")
    ax_v.scatter(*after.T, s=30, color="tab:blue", label="stored recall after")
    new_b, new_a = mem.W @ k, (mem.W + dW) @ k
    ax_v.scatter(*new_b.tolist(), s=40, facecolor="none", edgecolor="tab:red", label="new key's recall before")
    ax_v.scatter(*v.tolist(), s=220, marker="*", color="gold", edgecolor="k", zorder=4, label="value to write v")
    ax_v.scatter(*new_a.tolist(), s=25, color="tab:red", zorder=5, label="new key's recall after")
    lim_v = 1.15 * float(torch.cat([before, after, new_b[None], new_a[None], v[None]]).abs().max())
    ax_v.set(xlim=(-lim_v, lim_v), ylim=(-lim_v, lim_v), aspect="equal", title="value space", xlabel="$v_1$",
             ylabel="$v_2$")
    ax_v.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{UPDATES[rule]}: error on the new key {write_error(mem.W, dW, k, v):.2f}; mean squared "
                 f"disturbance of the data's keys {mean_sq_disturbance(dW, mem.keys):.3f}", fontsize=10)
    fig.tight_layout()
    return fig


def toy_explorer(mem: ToyMemory, v: torch.Tensor, angle_deg: float = 60.0, length: float = 1.0,
                 rule: str = "whitened"):
    """An ipywidgets ``VBox``: choose the write rule (dropdown) and the new key's direction (slider, degrees);
    the figure of :func:`plot_write` is redrawn into an ``Output`` whose ``outputs`` hold a PNG, so an executed
    notebook stores a filled-in explorer that renders on a static page."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from .widgets import figure_output

    if rule not in UPDATES:
        raise ValueError(f"unknown rule {rule!r}: choose one of {list(UPDATES)}.")
    rule_w = widgets.Dropdown(options=[(label, name) for name, label in UPDATES.items()], value=rule,
                              description="Write rule")
    angle_w = widgets.IntSlider(value=int(angle_deg), min=0, max=179, step=5, description="Key angle °",
                                continuous_update=False)
    out = widgets.Output()

    def draw(_change=None) -> None:
        fig = plot_write(mem, unit_key(angle_w.value, length), v, rule_w.value)
        out.outputs = (figure_output(fig, f"toy memory: {UPDATES[rule_w.value]}, key at {angle_w.value}°"),)
        plt.close(fig)

    rule_w.observe(draw, names="value")
    angle_w.observe(draw, names="value")
    draw()
    box = widgets.VBox([widgets.HBox([rule_w, angle_w]), out])
    box.rule, box.angle, box.figure = rule_w, angle_w, out
    return box
