"""Which rows each learner trains on, step by step: the driver's plan of one update.

RLlib's minibatch iterator cycles a shard until it fills `minibatch_size` rows, so rows are
trained twice and, with several learners, ranks take different numbers of optimizer steps. The
driver, which is the only place that sees the whole batch, plans the update instead:

- every epoch visits every row exactly once (a seeded permutation cut into near-equal
  minibatches of at most `minibatch_size` rows);
- each minibatch is split across the learners, so every learner takes the same number of
  optimizer steps (a learner may get no rows in a step; it still joins the gradient all-reduce);
- each step carries the loss normaliser of its whole minibatch (tokens for token-mean, sequences
  otherwise), so that the shards' losses sum to the minibatch's loss.

Within its shard of a step, a learner groups rows of similar length into micro-batches trimmed
to their longest row (`micro_batches`), so padding to the batch's longest row is not computed.

Pure numpy: no Ray, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Step:
    """One optimizer step: the row indices of each learner's shard and the minibatch's loss
    normaliser."""

    shards: tuple[np.ndarray, ...]
    normalizer: float

    @property
    def rows(self) -> np.ndarray:
        return np.concatenate(self.shards)


@dataclass(frozen=True)
class UpdatePlan:
    steps: tuple[Step, ...]
    num_learners: int

    def shard(self, rank: int) -> list[tuple[np.ndarray, float]]:
        """(rows, normaliser) of each step, for learner `rank`."""
        return [(step.shards[rank], step.normalizer) for step in self.steps]


def loss_normalizer(resp_mask: np.ndarray, rows: np.ndarray, token_mean: bool) -> float:
    """The denominator of the minibatch's loss: its response tokens (token-mean aggregation) or
    its rows with at least one response token (sequence-mean aggregations)."""
    tokens = resp_mask[rows].sum(-1)
    return max(float(tokens.sum() if token_mean else (tokens > 0).sum()), 1.0)


def plan_update(
    resp_mask: np.ndarray,
    *,
    num_learners: int,
    num_epochs: int = 1,
    minibatch_size: int | None = None,
    shuffle: bool = True,
    token_mean: bool = True,
    seed: int = 0,
) -> UpdatePlan:
    """The steps of one update of a batch whose response mask is `resp_mask` ([rows, tokens]).

    `minibatch_size` None: one step per epoch on the whole batch. Shards of a minibatch are
    contiguous runs of its (shuffled) rows, as equal in size as the rows allow.
    """
    rows = len(resp_mask)
    if rows == 0:
        raise ValueError("cannot plan an update of an empty batch")
    if num_learners < 1:
        raise ValueError(f"num_learners must be >= 1, got {num_learners}")
    size = rows if minibatch_size is None else min(int(minibatch_size), rows)
    if size < 1:
        raise ValueError(f"minibatch_size must be >= 1, got {minibatch_size}")
    count = -(-rows // size)  # ceil: no minibatch exceeds minibatch_size
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(num_epochs):
        order = rng.permutation(rows) if shuffle else np.arange(rows)
        for minibatch in np.array_split(order, count):
            steps.append(
                Step(
                    shards=tuple(np.array_split(minibatch, num_learners)),
                    normalizer=loss_normalizer(resp_mask, minibatch, token_mean),
                )
            )
    return UpdatePlan(tuple(steps), num_learners)


def split_rows(rows: int, num_learners: int) -> list[np.ndarray]:
    """Contiguous, near-equal row ranges, one per learner (for the sharded scoring pass)."""
    return np.array_split(np.arange(rows), num_learners)


def micro_batches(lengths: np.ndarray, size: int, bucket: bool = True) -> list[tuple[np.ndarray, int | None]]:
    """How a learner cuts its rows (real lengths `lengths`, left-padded to one width) into
    micro-batches of at most `size` rows: (positions into `lengths`, the micro-batch's width, or
    None to keep the batch's).

    With `bucket`, rows go longest first, so rows of similar length share a micro-batch, and
    each is trimmed to its longest row: the columns cut are padding in every row of it, so no
    token's value changes. Without, in order and at the full width. Either way every row is in
    exactly one micro-batch, and the count is the same; the loss is a sum over tokens divided by
    the minibatch's normaliser, so the order of its terms is all that changes.
    """
    lengths = np.asarray(lengths)
    if not bucket:
        return [(np.arange(s, min(s + size, len(lengths))), None) for s in range(0, len(lengths), size)]
    order = np.argsort(-lengths, kind="stable")
    return [(order[s : s + size], int(lengths[order[s]])) for s in range(0, len(order), size)]
