"""Token-level policy-gradient losses: clipped surrogate (GRPO / DAPO clip-higher), k3 KL,
aggregation modes, the truncated importance weight of decoupled PPO, and full-vocabulary token
entropy.

All tensors are [batch, tokens] with a 0/1 (or bool) `mask` marking the generated tokens that
count; masked positions never contribute, even when they hold NaN or inf.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]
AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


def log_softmax_and_entropy(
    logits: torch.Tensor, temperature: float = 1.0, allowed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / temperature) over the vocabulary and its Shannon entropy.

    `allowed` (bool, shaped like `logits`): the distribution renormalised over the allowed tokens,
    as constrained decoding samples it; disallowed tokens get log-prob -inf and add nothing to
    the entropy.
    """
    log_probs = log_softmax(logits, temperature, allowed)
    return log_probs, entropy_of(log_probs, allowed)


def log_softmax(logits: torch.Tensor, temperature: float = 1.0, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(logits / temperature) in fp32, -inf at the tokens `allowed` excludes."""
    scaled = logits.float() / temperature
    if allowed is not None:
        scaled = scaled.masked_fill(~allowed, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


def entropy_of(log_probs: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Shannon entropy of a distribution given as log-probs over its last dimension, -inf at the
    tokens `allowed` excludes."""
    # 0 * log 0 := 0, written so that no NaN reaches the gradient of masked tokens.
    finite = log_probs if allowed is None else log_probs.masked_fill(~allowed, 0.0)
    return -(log_probs.exp() * finite).sum(-1)


def token_logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, allowed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(token | prefix) at `temperature` and the full-vocabulary entropy, from one
    log-softmax; logits [B, T, V] already aligned with tokens [B, T]."""
    log_probs, entropy = log_softmax_and_entropy(logits, temperature, allowed)
    return log_probs.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1), entropy


def masked_aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: Aggregation = "token_mean",
    normalizer: float | None = None,
) -> torch.Tensor:
    """Reduce per-token values to a scalar.

    token_mean:           sum over all tokens / number of tokens (DAPO).
    seq_mean_token_mean:  mean over sequences of each sequence's token mean (GRPO).
    seq_mean_token_sum:   mean over sequences of each sequence's token sum (Dr.GRPO).
    `normalizer` replaces the denominator (tokens for token_mean, sequences otherwise) so that
    micro-batches of one batch sum to the loss of the whole batch under gradient accumulation.
    """
    mask = mask.to(values.dtype)
    masked = torch.where(mask > 0, values, torch.zeros_like(values))
    if mode == "token_mean":
        total = masked.sum()
        count = mask.sum() if normalizer is None else normalizer
    elif mode in ("seq_mean_token_mean", "seq_mean_token_sum"):
        tokens_per_seq = mask.sum(-1)
        per_seq = masked.sum(-1)
        if mode == "seq_mean_token_mean":
            per_seq = per_seq / tokens_per_seq.clamp(min=1)
        total = per_seq.sum()
        count = (tokens_per_seq > 0).sum() if normalizer is None else normalizer
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {AGGREGATIONS}")
    count_t = torch.as_tensor(count, dtype=values.dtype, device=values.device)
    return total / count_t.clamp(min=1)


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped objective, negated as a loss, and whether each token was clipped.

    L = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A),  r = exp(logp - old_logp).
    clip_high > clip_low is DAPO's clip-higher.
    """
    log_ratio = torch.where(mask > 0, logp - old_logp, torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    advantages = torch.where(mask > 0, advantages, torch.zeros_like(advantages))
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped) & (mask > 0)
    return loss, was_clipped


def truncated_importance_weight(
    proximal_logp: np.ndarray, behaviour_logp: np.ndarray, mask: np.ndarray, cap: float
) -> np.ndarray:
    """min(pi_prox / pi_behav, cap) per token (1 where masked): the behaviour weight of decoupled
    PPO, truncated so that one stale, unlikely token cannot dominate the update."""
    log_w = np.where(mask > 0, proximal_logp - behaviour_logp, 0.0)
    return np.exp(np.minimum(log_w, np.log(cap))).astype(np.float32)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: Aggregation = "token_mean",
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    normalizer: float | None = None,
    behaviour_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate (+ kl_coef * k3 KL to a reference) aggregated over unmasked tokens.

    Decoupled PPO (asynchronous sampling): `old_logp` is the learner's pre-update pass (the
    proximal policy the ratio is clipped against) and `behaviour_weight` the truncated
    importance weight min(exp(old_logp - behaviour_logp), cap) of each token, which multiplies
    its surrogate: the samples came from an older policy than the one being clipped against.

    Returns the scalar loss and detached statistics that add up over micro-batches and learner
    shards of one minibatch (given the minibatch's `normalizer`): `policy_loss` (this part's
    share of the surrogate), and the sums `clipped`, `ratio`, `kl` and `tokens` over its
    unmasked tokens, from which the minibatch's clip fraction, mean ratio and KL follow.
    """
    surrogate, was_clipped = clipped_surrogate(logp, old_logp, advantages, mask, clip_low, clip_high)
    if behaviour_weight is not None:
        surrogate = surrogate * behaviour_weight
    per_token = surrogate
    fmask = mask.float()
    stats: dict[str, torch.Tensor] = {}
    if ref_logp is not None and kl_coef != 0.0:
        kl = kl_k3(logp, ref_logp)
        per_token = per_token + kl_coef * kl
        stats["kl"] = torch.where(mask > 0, kl.detach(), torch.zeros_like(kl)).sum()
    loss = masked_aggregate(per_token, mask, aggregation, normalizer)
    with torch.no_grad():
        stats["policy_loss"] = masked_aggregate(surrogate.detach(), mask, aggregation, normalizer)
        stats["clipped"] = was_clipped.float().sum()
        ratio = torch.exp(torch.where(mask > 0, logp - old_logp, torch.zeros_like(logp)))
        stats["ratio"] = (ratio * fmask).sum()
        stats["tokens"] = fmask.sum()
    return loss, stats
