"""Teacher-forced scoring of sampled responses: per-token log-probs and entropies.

The learner's view of the same tokens the engine sampled. Sequences are left-padded so every
response ends at the last column, the same layout the engine samples with.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from empg_rllib.inference.choices import allowed_mask, allowed_tensor
from empg_rllib.losses import token_logprobs_and_entropy


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, L], attention_mask [B, L]) with each sequence right-aligned."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, length - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, length - len(seq) :] = 1
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions of left-padded rows: 0 at each row's first real token."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def scores_of_tokens(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, allowed_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies [B, T]; with `allowed_ids` [B, R, K] (constrained
    decoding, -1 padded) the last R positions are scored over their allowed tokens only."""
    if allowed_ids is None:
        return token_logprobs_and_entropy(logits, tokens, temperature)
    r = allowed_ids.shape[1]
    head = token_logprobs_and_entropy(logits[:, :-r], tokens[:, :-r], temperature)
    tail = token_logprobs_and_entropy(
        logits[:, -r:], tokens[:, -r:], temperature, allowed_mask(allowed_ids.to(logits.device), logits.shape[-1])
    )
    return torch.cat([head[0], tail[0]], dim=1), torch.cat([head[1], tail[1]], dim=1)


def response_logits(
    model: Any, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits predicting each response token, the response tokens, and their mask (all [B, R])."""
    sequences = [list(p) + list(r) for p, r in zip(prompts, responses)]
    ids, mask = left_pad(sequences, pad_id)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    width = max(len(r) for r in responses)
    # Position j predicts token j + 1, so the response's logits end one column before the end.
    resp_logits = logits[:, -width - 1 : -1, :]
    resp_tokens = ids[:, -width:]
    resp_mask = torch.zeros_like(resp_tokens)
    for row, r in enumerate(responses):
        if len(r):
            resp_mask[row, width - len(r) :] = 1
    return resp_logits, resp_tokens, resp_mask


@torch.no_grad()
def score_responses(
    model: Any,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    temperature: float = 1.0,
    allowed: Sequence[Sequence[Sequence[int]] | None] | None = None,
) -> tuple[list[list[float]], list[list[float]]]:
    """Per response: log-probs and full-vocabulary entropies of its tokens at `temperature`;
    `allowed` gives, per response, the allowed token ids of each position (constrained
    decoding) or None."""
    logits, tokens, mask = response_logits(model, prompts, responses, pad_id)
    allowed_ids = allowed_tensor(allowed, tokens.shape[1])
    logp, entropy = scores_of_tokens(logits, tokens, temperature, allowed_ids)
    out_logp, out_entropy = [], []
    for row, r in enumerate(responses):
        n = len(r)
        out_logp.append(logp[row, logp.shape[1] - n :].tolist() if n else [])
        out_entropy.append(entropy[row, entropy.shape[1] - n :].tolist() if n else [])
    return out_logp, out_entropy
