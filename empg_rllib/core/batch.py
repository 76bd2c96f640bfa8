"""Episodes -> the learner's per-turn train batch, and the advantage of every token.

Pure numpy (no Ray): one row per LLM turn, prompt + sampled response ids left-padded, so the
learner sees exactly the tokens the engine sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from empg_rllib.core.advantages import EMPGTerms, empg_terms, group_advantages
from empg_rllib.core.choices import pad_allowed
from empg_rllib.core.records import Episode


@dataclass
class TurnBatch:
    """Columns aligned with input_ids[:, 1:] unless named otherwise; one row per turn."""

    input_ids: np.ndarray  # [N, L] int64
    attention_mask: np.ndarray  # [N, L] int64
    resp_mask: np.ndarray  # [N, L-1] float32: 1 where the next token was sampled
    sampler_logp: np.ndarray  # [N, L-1] float32: behaviour log-probs from the engine
    traj_index: np.ndarray  # [N] which episode
    step_index: np.ndarray  # [N] which turn of it
    # Constrained decoding: [N, R, K] allowed token ids (-1 padded) of the last R token
    # positions; None when no turn was constrained.
    allowed_ids: np.ndarray | None = None
    # [N, L-1] float32: the engine's entropies at the sampled positions; None unless every turn
    # has them (the HF engine computes them, vLLM does not).
    sampler_entropy: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def choice_mask(self) -> np.ndarray:
        """[N, L-1] 1 where the sampler had more than one token to choose from: every token of an
        unconstrained turn, and the tokens of a constrained one with several allowed ids."""
        mask = np.ones_like(self.resp_mask)
        if self.allowed_ids is not None:
            options = (self.allowed_ids >= 0).sum(-1)  # 0: unconstrained position
            width = options.shape[1]
            mask[:, -width:] = (options != 1).astype(np.float32)
        return mask


def build_turn_batch(episodes: Sequence[Episode], pad_id: int) -> TurnBatch:
    rows = [(e_idx, t_idx, turn) for e_idx, ep in enumerate(episodes) for t_idx, turn in enumerate(ep.turns)]
    if not rows:
        raise ValueError("no turns to train on")
    width = max(len(t.prompt_ids) + len(t.response_ids) for _, _, t in rows)
    n = len(rows)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((n, width), dtype=np.int64)
    resp_mask = np.zeros((n, width - 1), dtype=np.float32)
    sampler_logp = np.zeros((n, width - 1), dtype=np.float32)
    with_entropy = all(t.entropies is not None for _, _, t in rows)
    sampler_entropy = np.zeros((n, width - 1), dtype=np.float32) if with_entropy else None
    for row, (_, _, turn) in enumerate(rows):
        seq = turn.prompt_ids + turn.response_ids
        start = width - len(seq)
        input_ids[row, start:] = seq
        attention_mask[row, start:] = 1
        r = len(turn.response_ids)
        if r:
            resp_mask[row, width - 1 - r :] = 1.0
            sampler_logp[row, width - 1 - r :] = turn.logprobs
            if sampler_entropy is not None:
                sampler_entropy[row, width - 1 - r :] = turn.entropies
    allowed = pad_allowed([t.allowed_token_ids for _, _, t in rows], max(len(t.response_ids) for _, _, t in rows))
    return TurnBatch(
        input_ids,
        attention_mask,
        resp_mask,
        sampler_logp,
        np.array([e for e, _, _ in rows], dtype=np.int64),
        np.array([t for _, t, _ in rows], dtype=np.int64),
        allowed,
        sampler_entropy,
    )


def episode_advantages(episodes: Sequence[Episode], scale_by_std: bool = True) -> np.ndarray:
    """Group-relative outcome advantage of each episode (groups = same `group`)."""
    return group_advantages(
        [e.reward for e in episodes], [str(e.group) for e in episodes], scale_by_std=scale_by_std
    )


def drop_uninformative_groups(episodes: Sequence[Episode]) -> tuple[list[Episode], int]:
    """DAPO's dynamic sampling filter: drop groups whose rewards are all equal (zero signal)."""
    rewards: dict[str, set[float]] = {}
    for e in episodes:
        rewards.setdefault(str(e.group), set()).add(e.reward)
    kept = [e for e in episodes if len(rewards[str(e.group)]) > 1]
    return kept, sum(len(r) == 1 for r in rewards.values())


def token_advantages(
    batch: TurnBatch,
    episode_advantage: np.ndarray,
    step_entropy: np.ndarray | None,
    empg: dict | None,
) -> tuple[np.ndarray, np.ndarray, EMPGTerms | None]:
    """Per-step advantages (EMPG-modulated over the whole batch when `empg` is given) and the
    same value broadcast to every sampled token of the step."""
    base = episode_advantage[batch.traj_index]
    terms = None
    if empg is not None:
        terms = empg_terms(step_entropy, batch.traj_index, batch.step_index, base, **empg)
        step_adv = terms.advantage
    else:
        step_adv = base
    return step_adv, (step_adv[:, None] * batch.resp_mask).astype(np.float32), terms

