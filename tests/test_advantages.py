"""Group advantages and EMPG modulation against EMPG.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from empg_rllib.core.advantages import empg_modulate, empg_terms, group_advantages


# ---- an independent, loop-based reading of EMPG.md, for cross-checking -----------------------
def reference_empg(rows, k=1.0, k_f=1.0, zeta=0.1, use_scaling=True, use_bonus=True, std_normalize=False):
    """rows: list of (traj, step, entropy, base_advantage), any order."""
    entropies = [r[2] for r in rows]
    lo, hi = min(entropies), max(entropies)
    hn = {(r[0], r[1]): (r[2] - lo) / (hi - lo + 1e-8) for r in rows}
    mean_scale = sum(math.exp(-k * h) for h in hn.values()) / len(rows)
    out = []
    for traj, step, _, adv in rows:
        g = math.exp(-k * hn[(traj, step)]) / mean_scale if use_scaling else 1.0
        later = [s for (t, s) in hn if t == traj and s > step]
        bonus = 0.0
        if later and use_bonus:
            bonus = zeta * math.exp(-k_f * hn[(traj, min(later))])
        out.append(g * adv + bonus)
    mean = sum(out) / len(out)
    out = [v - mean for v in out]
    if std_normalize and len(out) > 1:
        std = math.sqrt(sum(v * v for v in out) / (len(out) - 1))
        out = [v / (std + 1e-8) for v in out]
    return np.array(out)


@st.composite
def batches(draw, min_trajs=1, max_trajs=6, max_steps=6):
    """A shuffled batch of steps: (entropy, traj, step, base advantage) arrays."""
    n_traj = draw(st.integers(min_trajs, max_trajs))
    rows = []
    for traj in range(n_traj):
        n_steps = draw(st.integers(1, max_steps))
        adv = draw(st.floats(-3, 3, allow_nan=False))
        for step in range(n_steps):
            rows.append((traj, step, draw(st.floats(0, 8, allow_nan=False)), adv))
    perm = draw(st.permutations(range(len(rows))))
    rows = [rows[i] for i in perm]
    return rows


def columns(rows):
    traj, step, entropy, adv = (np.array(c) for c in zip(*rows))
    return entropy, traj, step, adv


# ---- group advantages ----------------------------------------------------------------------
def test_group_advantages_matches_torch_std_per_group():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.2])
    groups = np.array([7, 7, 7, 3, 3, 3, 9])
    adv = group_advantages(rewards, groups)
    for g in (7, 3):
        sel = groups == g
        r = torch.tensor(rewards[sel])
        np.testing.assert_allclose(adv[sel], ((r - r.mean()) / (r.std() + 1e-6)).numpy(), rtol=1e-12)
    assert adv[groups == 9] == 0.0  # a group of one has no baseline


def test_drgrpo_does_not_scale_by_std():
    adv = group_advantages([1.0, 0.0, 0.0, 0.0], [0, 0, 0, 0], scale_by_std=False)
    np.testing.assert_allclose(adv, [0.75, -0.25, -0.25, -0.25])


def test_all_equal_rewards_give_zero_advantage():
    assert np.all(group_advantages([1.0, 1.0, 1.0], ["a", "a", "a"]) == 0.0)


def test_group_advantages_accepts_torch():
    adv = group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    assert isinstance(adv, np.ndarray) and adv[0] > 0 > adv[1]


@pytest.mark.parametrize(
    "rewards, groups, message",
    [([1.0], [0, 1], "length mismatch"), ([], [], "empty"), ([float("nan")], [0], "NaN")],
)
def test_group_advantages_bad_input(rewards, groups, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(rewards, groups)


# ---- EMPG ----------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(batches(), st.floats(0, 3), st.floats(0, 3), st.floats(0, 1), st.booleans(), st.booleans(), st.booleans())
def test_matches_independent_reference(rows, k, k_f, zeta, use_scaling, use_bonus, std_normalize):
    flags = dict(use_scaling=use_scaling, use_bonus=use_bonus, std_normalize=std_normalize)
    got = empg_modulate(*columns(rows), k=k, k_f=k_f, zeta=zeta, **flags)
    np.testing.assert_allclose(got, reference_empg(rows, k, k_f, zeta, **flags), atol=1e-9, rtol=1e-7)


@settings(max_examples=200, deadline=None)
@given(batches(), st.floats(0, 3), st.floats(0, 1))
def test_zero_mean_and_g_mean_one(rows, k, zeta):
    terms = empg_terms(*columns(rows), k=k, zeta=zeta)
    assert abs(terms.advantage.mean()) < 1e-9
    assert terms.g.mean() == pytest.approx(1.0, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(batches(), st.randoms(use_true_random=False))
def test_permutation_invariant(rows, rnd):
    order = list(range(len(rows)))
    rnd.shuffle(order)
    base = empg_modulate(*columns(rows))
    shuffled = empg_modulate(*columns([rows[i] for i in order]))
    np.testing.assert_allclose(shuffled, base[order], atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(batches(), st.floats(0, 5))
def test_equal_entropies_reduce_to_centred_base_advantage(rows, h):
    rows = [(t, s, h, a) for t, s, _, a in rows]
    entropy, traj, step, adv = columns(rows)
    got = empg_modulate(entropy, traj, step, adv, zeta=0.0)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, adv - adv.mean(), atol=1e-9)


@settings(max_examples=200, deadline=None)
@given(batches(), st.floats(0, 3))
def test_lower_entropy_never_smaller_scale(rows, k):
    entropy, traj, step, adv = columns(rows)
    g = empg_terms(entropy, traj, step, adv, k=k).g
    order = np.argsort(entropy, kind="stable")
    assert np.all(np.diff(np.abs(g[order])) <= 1e-12)


@settings(max_examples=100, deadline=None)
@given(batches())
def test_last_step_gets_no_bonus(rows):
    entropy, traj, step, adv = columns(rows)
    terms = empg_terms(entropy, traj, step, adv, zeta=0.5)
    last = np.array([s == max(s2 for t2, s2, *_ in rows if t2 == t) for t, s, *_ in rows])
    assert np.all(terms.f_next[last] == 0.0)
    assert np.all(terms.f_next[~last] > 0.0)
    assert np.array_equal(terms.has_next, ~last)


def test_confident_error_is_penalised_harder():
    # One failed trajectory, two steps: the confident one (low entropy) gets the larger penalty.
    adv = empg_modulate([0.1, 2.0, 1.0, 1.0], [0, 0, 1, 1], [0, 1, 0, 1], [-1.0, -1.0, 1.0, 1.0], zeta=0.0)
    assert adv[0] < adv[1]


def test_bonus_comes_from_next_step_of_same_trajectory():
    # traj 0 steps 0,1 and traj 1 step 0; with k = 0 g = 1, so only the bonus differs.
    terms = empg_terms([0.0, 1.0, 0.5], [0, 0, 1], [0, 1, 0], [0.0, 0.0, 0.0], k=0.0, k_f=1.0, zeta=1.0)
    np.testing.assert_allclose(terms.f_next, [math.exp(-1.0), 0.0, 0.0], atol=1e-7)


def test_ablations():
    entropy, traj, step, adv = [0.1, 0.9, 0.5], [0, 0, 1], [0, 1, 0], [1.0, 1.0, -1.0]
    no_scale = empg_terms(entropy, traj, step, adv, use_scaling=False)
    assert np.all(no_scale.g == 1.0)
    no_bonus = empg_terms(entropy, traj, step, adv, use_bonus=False)
    assert np.all(no_bonus.f_next == 0.0)


def test_std_normalize_gives_unit_std():
    adv = empg_modulate([0.1, 0.9, 0.5, 0.3], [0, 0, 1, 1], [0, 1, 0, 1], [1.0, 1.0, -1.0, -1.0], std_normalize=True)
    assert adv.std(ddof=1) == pytest.approx(1.0, abs=1e-6)


def test_accepts_torch_tensors():
    adv = empg_modulate(torch.tensor([0.1, 0.9]), torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([1.0, 1.0]))
    assert isinstance(adv, np.ndarray) and adv.shape == (2,)
    # The same values as from plain lists, and the reference's (not merely an array of zeros).
    expected = reference_empg([(0, 0, 0.1, 1.0), (0, 1, 0.9, 1.0)])
    np.testing.assert_allclose(adv, empg_modulate([0.1, 0.9], [0, 0], [0, 1], [1.0, 1.0]), atol=1e-6)
    np.testing.assert_allclose(adv, expected, atol=1e-6)
    assert abs(adv[0] - adv[1]) > 0.1


@pytest.mark.parametrize(
    "args, message",
    [
        (([0.1, 0.2], [0, 0], [0], [1.0, 1.0]), "length mismatch"),
        (([], [], [], []), "empty batch"),
        (([0.1, float("nan")], [0, 0], [0, 1], [1.0, 1.0]), "NaN"),
        (([0.1, 0.2], [3, 3], [1, 1], [1.0, 1.0]), r"duplicate .* \(3, 1\)"),
    ],
)
def test_empg_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        empg_modulate(*args)


def test_step_entropy_all_tokens_and_choice_tokens():
    from empg_rllib.core.advantages import step_entropy

    entropy = np.array([[0.0, 2.0, 0.0, 0.0], [9.0, 1.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    resp = np.array([[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=np.float32)
    # Paper (all_tokens): the mean over the step's generated tokens, forced ones included.
    np.testing.assert_allclose(step_entropy(entropy, resp), [2 / 3, 1.5, 0.0])
    # choice_tokens: a 3-token action with one real choice keeps that choice's entropy, however
    # many forced tokens follow; a step without any choice gets 0.
    choice = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=np.float32)
    np.testing.assert_allclose(step_entropy(entropy, resp, choice), [2.0, 3.0, 0.0])
    with pytest.raises(ValueError, match="same"):
        step_entropy(entropy, resp[:, :3])


def test_choice_mask_of_a_turn_batch():
    from empg_rllib.core.batch import TurnBatch

    resp = np.array([[0, 1, 1, 1], [0, 0, 1, 1]], dtype=np.float32)
    allowed = np.full((2, 3, 2), -1, dtype=np.int32)
    allowed[0, :, 0] = [4, 5, 6]
    allowed[0, 0, 1] = 8  # two options at the action's first token, then forced tokens
    # row 1 unconstrained: all padding means every token was allowed
    batch = TurnBatch(np.zeros((2, 5)), np.ones((2, 5)), resp, np.zeros((2, 4)), np.arange(2), np.zeros(2), allowed)
    np.testing.assert_array_equal(batch.choice_mask(), [[1, 1, 0, 0], [1, 1, 1, 1]])
