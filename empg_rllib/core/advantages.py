"""Advantage estimation: group-relative baselines (GRPO, Dr.GRPO) and EMPG modulation.

Pure math over flat numpy arrays (torch tensors are accepted and converted); no Ray here.
The spec is ../shared/docs/EMPG.md: each function names the equation it implements.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


def _as_array(values: Any, name: str, dtype: type = np.float64) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor; converting avoids importing torch here
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=dtype)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def _check_lengths(**arrays: np.ndarray) -> int:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"length mismatch: {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError("empty batch: no rows to compute advantages for")
    return n


def group_advantages(
    rewards: Any,
    group_ids: Any,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> np.ndarray:
    """Group-relative advantage per trajectory; groups of one get 0.

    GRPO:     A_i = (R_i - mean_g R) / (std_g R + eps), std unbiased as torch.std.
    Dr.GRPO:  A_i =  R_i - mean_g R                      (scale_by_std=False).
    """
    rewards = _as_array(rewards, "rewards")
    group_ids = np.asarray(group_ids.detach().cpu() if hasattr(group_ids, "detach") else group_ids)
    if group_ids.ndim != 1:
        raise ValueError(f"group_ids must be one-dimensional, got shape {group_ids.shape}")
    _check_lengths(rewards=rewards, group_ids=group_ids)
    if not np.all(np.isfinite(rewards)):
        raise ValueError("rewards contain NaN or inf")

    advantages = np.zeros_like(rewards)
    _, group_of_row = np.unique(group_ids, return_inverse=True)
    for group in np.unique(group_of_row):
        rows = group_of_row == group
        if rows.sum() < 2:
            continue
        centred = rewards[rows] - rewards[rows].mean()
        advantages[rows] = centred / (rewards[rows].std(ddof=1) + eps) if scale_by_std else centred
    return advantages


def step_entropy(token_entropy: Any, response_mask: Any, choice_mask: Any | None = None) -> np.ndarray:
    """Eq. 1: H_t of each step (row), the mean of its tokens' full-vocabulary entropies.

    `token_entropy`, `response_mask`: [steps, tokens]; the mask marks the step's generated tokens.
    Without `choice_mask` ("all_tokens") this is the paper's definition: every generated token
    counts. With constrained decoding most tokens of an action are forced (a single allowed id,
    entropy 0), so the mean over all tokens shrinks with the length of the action string and a
    long action looks confident. `choice_mask` ("choice_tokens", a project choice) keeps only the
    tokens where the policy had more than one option; a step with no such token (the
    environment admitted a single action) gets H_t = 0: there was nothing to be uncertain about.
    """
    entropy = np.asarray(token_entropy, dtype=np.float64)
    mask = np.asarray(response_mask, dtype=np.float64)
    if choice_mask is not None:
        mask = mask * np.asarray(choice_mask, dtype=np.float64)
    if entropy.shape != mask.shape or entropy.ndim != 2:
        raise ValueError(f"token_entropy {entropy.shape} and the masks {mask.shape} must be the same [steps, tokens]")
    return (entropy * mask).sum(-1) / np.maximum(mask.sum(-1), 1)


class EMPGTerms(NamedTuple):
    """Per-step intermediate quantities of EMPG, for metrics and inspection."""

    normalized_entropy: np.ndarray  # Hn
    g: np.ndarray  # self-calibrating scale of each step
    f_next: np.ndarray  # future-clarity bonus f(H_{t+1}); 0 at a trajectory's last step
    has_next: np.ndarray  # bool: the step has a next step in the same trajectory
    advantage: np.ndarray  # final modulated advantage


def empg_terms(
    step_entropy: Any,
    traj_index: Any,
    step_index: Any,
    base_advantage: Any,
    k: float = 1.0,
    k_f: float = 1.0,
    zeta: float = 0.1,
    use_scaling: bool = True,
    use_bonus: bool = True,
    std_normalize: bool = False,
    eps: float = 1e-8,
) -> EMPGTerms:
    """EMPG over all steps of a batch (rows in any order); see `empg_modulate`."""
    entropy = _as_array(step_entropy, "step_entropy")
    traj = _as_array(traj_index, "traj_index", dtype=np.int64)
    step = _as_array(step_index, "step_index", dtype=np.int64)
    base = _as_array(base_advantage, "base_advantage")
    n = _check_lengths(
        step_entropy=entropy, traj_index=traj, step_index=step, base_advantage=base
    )
    if np.isnan(entropy).any():
        raise ValueError(f"step_entropy contains NaN at rows {np.flatnonzero(np.isnan(entropy))[:10].tolist()}")
    if not np.all(np.isfinite(entropy)):
        raise ValueError("step_entropy contains inf")
    if not np.all(np.isfinite(base)):
        raise ValueError("base_advantage contains NaN or inf")

    # Sorting by (trajectory, step) puts every step right before its successor.
    order = np.lexsort((step, traj))
    same_traj_as_next = traj[order][1:] == traj[order][:-1]
    duplicate = same_traj_as_next & (step[order][1:] == step[order][:-1])
    if duplicate.any():
        row = order[1:][duplicate][0]
        raise ValueError(f"duplicate (traj_index, step_index) pair ({traj[row]}, {step[row]})")

    # Eq. 2: batch min-max normalisation, Hn = (H - min H) / (max H - min H + eps).
    hn = (entropy - entropy.min()) / (entropy.max() - entropy.min() + eps)

    # Eq. 3: g = exp(-k Hn) / mean(exp(-k Hn)), so the mean of g over steps is 1.
    if use_scaling:
        scale = np.exp(-k * hn)
        g = scale / scale.mean()
    else:
        g = np.ones(n)

    # Eq. 4-5: f(H_{t+1}) = exp(-k_f Hn_{t+1}), taken from the next step of the same trajectory.
    has_next = np.zeros(n, dtype=bool)
    f_next = np.zeros(n)
    has_next[order[:-1][same_traj_as_next]] = True
    f_next[order[:-1][same_traj_as_next]] = np.exp(-k_f * hn[order[1:][same_traj_as_next]])
    if not use_bonus:
        f_next[:] = 0.0

    # Eq. 5: A_mod = g(H_t) * A + zeta * f(H_{t+1}).
    modulated = g * base + zeta * f_next

    # Eq. 6: zero mean over the batch; dividing by the std is a project option (default off).
    modulated = modulated - modulated.mean()
    if std_normalize and n > 1:
        modulated = modulated / (modulated.std(ddof=1) + eps)
    return EMPGTerms(hn, g, f_next, has_next, modulated)


def empg_modulate(
    step_entropy: Any, traj_index: Any, step_index: Any, base_advantage: Any, **settings: Any
) -> np.ndarray:
    """Entropy-modulated advantage of every step of a batch (EMPG.md, steps 2-6).

    Rows are steps, in any order: `traj_index` names the trajectory and `step_index` orders the
    steps within it; the bonus of a step comes from the next larger `step_index` of the same
    trajectory. `base_advantage` is the trajectory's group advantage, repeated for each step.
    `settings` are `empg_terms`' (k, k_f, zeta, use_scaling, use_bonus, std_normalize, eps):
    `use_scaling=False` sets g = 1 and `use_bonus=False` drops f (the paper's ablations).
    Raises ValueError on length mismatch, an empty batch, NaN entropy or duplicate steps.
    """
    return empg_terms(step_entropy, traj_index, step_index, base_advantage, **settings).advantage
