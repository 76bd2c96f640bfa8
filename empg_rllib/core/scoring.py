"""Teacher-forced scoring of sampled responses: per-token log-probs and entropies.

The learner's view of the same tokens the engine sampled. Sequences are left-padded so every
response ends at the last column, the same layout the engine samples with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from empg_rllib.core.choices import allowed_mask, allowed_tensor
from empg_rllib.core.losses import entropy_of, log_softmax, token_logprobs_and_entropy


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


def response_width(resp_mask: torch.Tensor) -> int:
    """How many trailing columns of a [B, T] response mask hold some response token (responses
    are right-aligned, so these columns are all the positions that are ever scored)."""
    any_row = resp_mask.detach().bool().any(0)
    if not bool(any_row.any()):
        return 0
    return int(any_row.numel() - int(any_row.nonzero()[0]))


def _token_scores(
    head: torch.nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float, allowed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob (differentiable) and entropy (no grad) of `tokens` [N] from hidden states [N, H]."""
    log_probs = log_softmax(head(hidden), temperature, allowed)
    with torch.no_grad():
        entropy = entropy_of(log_probs, allowed)
    return log_probs.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1), entropy


def response_scores(
    lm: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    resp_mask: torch.Tensor,
    temperature: float = 1.0,
    allowed_ids: torch.Tensor | None = None,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies [B, T-1] (aligned with input_ids[:, 1:]) of a causal
    LM, computed at response positions only: 0 elsewhere.

    The same values as `scores_of_tokens` over the full logits, without ever holding logits for
    the prompt or more than `chunk_tokens` positions at once: the LM head and the log-softmax
    run per chunk of response positions (recomputed in the backward pass when grad is on), and
    the entropy carries no autograd graph. By arithmetic, with a 152k vocabulary, 2k-token rows and
    8 rows that is ~10 GB of fp32 logits for the full computation against ~0.6 GB per chunk of
    1024 positions.
    """
    rows, columns = resp_mask.shape
    logp_out = torch.zeros(rows, columns, device=input_ids.device)
    entropy_out = torch.zeros(rows, columns, device=input_ids.device)
    width = response_width(resp_mask)
    if width == 0:
        return logp_out, entropy_out
    hidden = lm.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
    ).last_hidden_state
    # Position p predicts token p + 1: the last `width` predictions sit at columns -width-1..-2.
    where = resp_mask[:, -width:].bool()
    hidden = hidden[:, -width - 1 : -1][where]
    tokens = input_ids[:, -width:][where]
    allowed = None
    if allowed_ids is not None:
        allowed_ids = allowed_ids.to(input_ids.device)
        if allowed_ids.shape[1] < width:  # positions before the recorded ones are unconstrained
            pad = allowed_ids.new_full((rows, width - allowed_ids.shape[1], allowed_ids.shape[2]), -1)
            allowed_ids = torch.cat([pad, allowed_ids], dim=1)
        allowed = allowed_ids[:, -width:][where]
    head = lm.get_output_embeddings()
    vocab = head.out_features
    logps, entropies = [], []
    for start in range(0, len(tokens), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        mask = None if allowed is None else allowed_mask(allowed[part], vocab)
        if torch.is_grad_enabled():
            logp, entropy = checkpoint(
                _token_scores, head, hidden[part], tokens[part], temperature, mask, use_reentrant=False
            )
        else:
            logp, entropy = _token_scores(head, hidden[part], tokens[part], temperature, mask)
        logps.append(logp)
        entropies.append(entropy)
    index = where.nonzero(as_tuple=True)
    offset = columns - width
    logp_out = logp_out.index_put((index[0], index[1] + offset), torch.cat(logps).float())
    entropy_out[index[0], index[1] + offset] = torch.cat(entropies).float()
    return logp_out, entropy_out


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
