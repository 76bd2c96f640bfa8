"""Teacher-forced scoring of sampled responses: per-token log-probs and entropies.

The learner's view of the same tokens the engine sampled. Sequences are left-padded so every
response ends at the last column, the same layout the engine samples with.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

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
) -> tuple[list[list[float]], list[list[float]]]:
    """Per response: log-probs and full-vocabulary entropies of its tokens at `temperature`."""
    logits, tokens, mask = response_logits(model, prompts, responses, pad_id)
    logp, entropy = token_logprobs_and_entropy(logits, tokens, temperature)
    out_logp, out_entropy = [], []
    for row, r in enumerate(responses):
        n = len(r)
        out_logp.append(logp[row, logp.shape[1] - n :].tolist() if n else [])
        out_entropy.append(entropy[row, entropy.shape[1] - n :].tolist() if n else [])
    return out_logp, out_entropy
