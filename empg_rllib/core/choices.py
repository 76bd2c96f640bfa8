"""Constrained decoding: a completion must be one of a given set of token sequences.

The sampling distribution at each position is the model's, renormalised over the tokens that
continue some allowed sequence (vLLM calls this guided choice). The allowed token ids of every
sampled position are recorded so that the learner scores the same distribution the sampler drew
from: policy log-probs and EMPG's step entropies are those of the constrained policy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_END = -1


class ChoiceTrie:
    """Prefix tree over token-id sequences; a node is a dict token -> child (`_END`: a sequence
    ends here). A sequence that is a prefix of another ends the completion where it ends."""

    def __init__(self, sequences: Sequence[Sequence[int]]) -> None:
        if not sequences or any(len(s) == 0 for s in sequences):
            raise ValueError("constrained decoding needs at least one choice and no empty choice")
        self.root: dict[int, dict] = {}
        for seq in sequences:
            node = self.root
            for token in seq:
                node = node.setdefault(int(token), {})
            node[_END] = {}


class ChoiceWalk:
    """A completion's position in a `ChoiceTrie`, advanced one sampled token at a time: what
    every engine, the vLLM logits processor and SFT share, so that all of them allow the same
    tokens at the same position."""

    def __init__(self, trie: ChoiceTrie) -> None:
        self._node: dict[int, dict] | None = trie.root

    @property
    def complete(self) -> bool:
        """An allowed sequence ends here: the completion is over."""
        return self._node is not None and _END in self._node

    @property
    def left(self) -> bool:
        """A token outside every allowed sequence was taken."""
        return self._node is None

    def allowed(self) -> list[int]:
        """Token ids that continue an allowed sequence from here ([] once complete or left)."""
        if self._node is None or self.complete:
            return []
        return [t for t in self._node if t != _END]

    def advance(self, token: int) -> None:
        """Take `token`; after the end of a sequence, or one outside them, the walk has left."""
        self._node = None if self._node is None or self.complete else self._node.get(int(token))


def walk(trie: ChoiceTrie, tokens: Sequence[int]) -> tuple[list[int], list[list[int]], bool]:
    """Walk `tokens` down `trie`: the tokens up to where an allowed sequence is complete (or up
    to the first token outside them), the allowed ids at each of those tokens, and whether a
    sequence was completed."""
    cursor = ChoiceWalk(trie)
    taken: list[int] = []
    allowed: list[list[int]] = []
    for token in tokens:
        options = cursor.allowed()
        cursor.advance(token)
        if cursor.left:
            break
        taken.append(int(token))
        allowed.append(options)
        if cursor.complete:
            break
    return taken, allowed, cursor.complete


def allowed_mask(allowed_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bool [..., vocab] from padded allowed-id lists [..., K] (-1 = padding). A position whose
    list is all padding is unconstrained (every token allowed)."""
    unconstrained = (allowed_ids < 0).all(-1, keepdim=True)
    index = torch.where(allowed_ids < 0, torch.full_like(allowed_ids, vocab_size), allowed_ids).long()
    mask = torch.zeros(*allowed_ids.shape[:-1], vocab_size + 1, dtype=torch.bool, device=allowed_ids.device)
    mask.scatter_(-1, index, True)
    return mask[..., :vocab_size] | unconstrained


def pad_allowed(per_row: Sequence[Sequence[Sequence[int]] | None], width: int) -> np.ndarray | None:
    """[rows, width, K] int32, -1 padded, each row's lists right-aligned in `width` positions
    (the layout of left-padded responses); None rows stay unconstrained, and with no
    constrained row at all there is nothing to mask: None."""
    if not any(per_row):
        return None
    k = max((len(ids) for row in per_row if row for ids in row), default=1)
    out = np.full((len(per_row), width, k), -1, dtype=np.int32)
    for r, row in enumerate(per_row):
        if row:
            for j, ids in enumerate(row):
                out[r, width - len(row) + j, : len(ids)] = ids
    return out


def allowed_tensor(per_row: Sequence[Sequence[Sequence[int]] | None] | None, width: int) -> torch.Tensor | None:
    """`pad_allowed` as a tensor for scoring; None when no row (or no `per_row`) is constrained."""
    padded = pad_allowed(per_row or (), width)
    return None if padded is None else torch.as_tensor(padded)
