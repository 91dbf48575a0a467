"""engram_helpers.toy_memory: the three write rules on small real computations (seeded)."""

from __future__ import annotations

import math

import matplotlib
import pytest
import torch

from engram_helpers import toy_memory as tm

matplotlib.use("Agg")

V = torch.tensor([-1.0, 1.0], dtype=torch.float64)


@pytest.fixture(scope="module")
def mem() -> tm.ToyMemory:
    return tm.make_memory(seed=0)


def test_make_memory_is_seeded_and_c_is_the_second_moment(mem):
    again = tm.make_memory(seed=0)
    assert torch.equal(mem.keys, again.keys) and torch.equal(mem.W, again.W)
    assert not torch.equal(mem.keys, tm.make_memory(seed=1).keys)
    manual = sum(torch.outer(k, k) for k in mem.keys) / len(mem.keys)
    assert torch.allclose(mem.C, manual)
    # Keys are common along angle_deg=30° and rare across it: C's top eigenvector points there.
    _, vecs = torch.linalg.eigh(mem.C)
    top = vecs[:, -1]
    assert abs(float(top @ tm.unit_key(30.0))) > 0.99


@pytest.mark.parametrize("angle", [0.0, 45.0, 70.0, 135.0])
def test_delta_and_whitened_write_exactly_hebbian_leaves_the_old_value(mem, angle):
    k = tm.unit_key(angle, length=1.3)
    for rule in ("delta", "whitened"):
        dW = tm.update(rule, mem.W, k, V, mem.C)
        assert tm.write_error(mem.W, dW, k, V) < 1e-12, rule
    dW = tm.hebbian_update(mem.W, k, V)
    # Hebb adds v on top of what k recalled before: the error is exactly the old recall W k.
    assert math.isclose(tm.write_error(mem.W, dW, k, V), float((mem.W @ k).norm()), rel_tol=1e-12)
    assert torch.allclose(tm.recall(mem.W + dW, k), mem.W @ k + V)


def test_every_update_is_rank_one(mem):
    k = tm.unit_key(70.0)
    for rule in tm.UPDATES:
        s = torch.linalg.svdvals(tm.update(rule, mem.W, k, V, mem.C))
        assert s[1] < 1e-12 * s[0], rule


def test_delta_disturbance_is_proportional_to_the_component_along_k(mem):
    k = tm.unit_key(70.0, length=1.3)
    dW = tm.delta_update(mem.W, k, V)
    dist = tm.disturbance(dW, mem.keys)
    along = (mem.keys @ k).abs() / k.norm()          # |component of each key along k|
    err = float((V - mem.W @ k).norm())
    assert torch.allclose(dist, err * along / k.norm(), atol=1e-12)
    # so a key with a larger component along k is moved more (ranks agree exactly)
    assert torch.equal(dist.argsort(), along.argsort())
    # keys orthogonal to k are untouched
    ortho = torch.tensor([-float(k[1]), float(k[0])], dtype=torch.float64)
    assert float((dW @ ortho).norm()) < 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("d", [2, 5])
def test_whitened_write_disturbs_the_data_keys_least_on_average(seed, d):
    """ROME's ΔW minimizes mean ‖ΔW kᵢ‖² over the keys C was estimated from, among all ΔW with ΔW k = v − W k
    (Cauchy–Schwarz: (kᵀk)² ≤ (kᵀCk)(kᵀC⁻¹k)); equality only when k is an eigenvector of C."""
    mem = tm.make_memory(d=d, spread=(1.0, 0.5, 0.25), seed=seed)
    gen = torch.Generator().manual_seed(100 + seed)
    v = torch.randn(d, generator=gen, dtype=torch.float64)
    for _ in range(20):
        k = torch.randn(d, generator=gen, dtype=torch.float64)
        white = tm.mean_sq_disturbance(tm.whitened_update(mem.W, k, v, mem.C), mem.keys)
        delta = tm.mean_sq_disturbance(tm.delta_update(mem.W, k, v), mem.keys)
        assert white <= delta * (1 + 1e-12)
        # and it is the minimum: adding any change that leaves k's recall alone increases it
        other = torch.randn(d, d, generator=gen, dtype=torch.float64)
        other = other - torch.outer(other @ k, k) / (k @ k)   # other @ k == 0
        dW = tm.whitened_update(mem.W, k, v, mem.C)
        assert tm.mean_sq_disturbance(dW + 0.1 * other, mem.keys) > white
    # with the key along an eigenvector of C the two rules coincide
    _, vecs = torch.linalg.eigh(mem.C)
    k = vecs[:, 0] * 2.0
    assert torch.allclose(tm.whitened_update(mem.W, k, v, mem.C), tm.delta_update(mem.W, k, v), atol=1e-10)


def test_whitened_write_protects_common_keys_at_the_cost_of_rare_ones(mem):
    """Keys along the common direction (30°) are moved less by the whitened write, keys across it more:
    the whitened write reads the rare direction."""
    k = tm.unit_key(70.0)
    white, delta = tm.whitened_update(mem.W, k, V, mem.C), tm.delta_update(mem.W, k, V)
    common, rare = tm.unit_key(30.0), tm.unit_key(120.0)
    assert float((white @ common).norm()) < float((delta @ common).norm())
    assert float((white @ rare).norm()) > float((delta @ rare).norm())
    u = tm.write_direction(white)
    assert abs(float(u @ rare)) > abs(float(u @ common))


def test_identity_statistics_turn_the_whitened_rule_into_the_delta_rule(mem):
    k = tm.unit_key(70.0)
    eye = torch.eye(2, dtype=torch.float64)
    assert torch.allclose(tm.whitened_update(mem.W, k, V, eye), tm.delta_update(mem.W, k, V))


def test_bad_input_raises_clear_errors(mem):
    with pytest.raises(ValueError, match="zero key"):
        tm.delta_update(mem.W, torch.zeros(2, dtype=torch.float64), V)
    with pytest.raises(ValueError, match="size 2"):
        tm.delta_update(mem.W, torch.ones(3, dtype=torch.float64), V)
    with pytest.raises(ValueError, match="key_statistics"):
        tm.update("whitened", mem.W, tm.unit_key(10.0), V)
    with pytest.raises(ValueError, match="unknown rule"):
        tm.update("oja", mem.W, tm.unit_key(10.0), V)
    with pytest.raises(ValueError, match="n ≥ d_k"):
        tm.key_statistics(torch.ones(1, 3))
    with pytest.raises(ValueError, match="rank one"):
        tm.write_direction(torch.eye(2))


def test_plot_and_explorer_draw_every_rule(mem):
    import matplotlib.pyplot as plt

    for rule in tm.UPDATES:
        fig = tm.plot_write(mem, tm.unit_key(70.0), V, rule)
        assert len(fig.axes) == 2
        plt.close(fig)
    box = tm.toy_explorer(mem, V, angle_deg=70.0)
    first = box.figure.outputs[0]["data"]["image/png"]
    box.rule.value = "delta"
    assert box.figure.outputs[0]["data"]["image/png"] != first
    assert "delta rule" in box.figure.outputs[0]["data"]["text/plain"]
    box.angle.value = 120
    assert "120°" in box.figure.outputs[0]["data"]["text/plain"]
