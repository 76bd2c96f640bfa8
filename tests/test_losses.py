"""Clipped surrogate, aggregation modes, k3 KL and token entropy."""

from __future__ import annotations

import math

import pytest
import torch

from empg_rllib.core.losses import (
    clipped_surrogate,
    kl_k3,
    log_softmax_and_entropy,
    masked_aggregate,
    policy_loss,
    token_logprobs_and_entropy,
)


def test_token_mean_vs_seq_mean_token_mean():
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert masked_aggregate(values, mask, "token_mean").item() == pytest.approx(8 / 5)
    assert masked_aggregate(values, mask, "seq_mean_token_mean").item() == pytest.approx((1 + 4) / 2)
    assert masked_aggregate(values, mask, "seq_mean_token_sum").item() == pytest.approx((4 + 4) / 2)


def test_masked_tokens_never_contribute_even_when_nan():
    values = torch.tensor([[1.0, float("nan")], [2.0, float("inf")]])
    mask = torch.tensor([[1, 0], [1, 0]])
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"):
        assert masked_aggregate(values, mask, mode).item() == pytest.approx(1.5)
    logp = torch.tensor([[0.0, float("nan")]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1, 0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert logp.grad[0, 1] == 0


def test_micro_batches_with_global_normalizer_sum_to_full_batch_loss():
    torch.manual_seed(0)
    logp, old = torch.randn(6, 5) * 0.1, torch.randn(6, 5) * 0.1
    adv, mask = torch.randn(6, 5), (torch.rand(6, 5) > 0.3).long()
    for mode, norm in (("token_mean", mask.sum().item()), ("seq_mean_token_mean", 6)):
        full, _ = policy_loss(logp, old, adv, mask, aggregation=mode)
        parts = sum(
            policy_loss(logp[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], aggregation=mode, normalizer=norm)[0]
            for i in range(0, 6, 2)
        )
        assert parts.item() == pytest.approx(full.item(), rel=1e-5)


def test_clip_higher_is_asymmetric():
    # ratio 1.25: inside DAPO's [0.8, 1.28] but outside GRPO's [0.8, 1.2].
    logp, old = torch.tensor([[math.log(1.25)]]), torch.zeros(1, 1)
    adv, mask = torch.ones(1, 1), torch.ones(1, 1)
    grpo, clipped_grpo = clipped_surrogate(logp, old, adv, mask, 0.2, 0.2)
    dapo, clipped_dapo = clipped_surrogate(logp, old, adv, mask, 0.2, 0.28)
    assert grpo.item() == pytest.approx(-1.2) and clipped_grpo.item()
    assert dapo.item() == pytest.approx(-1.25) and not clipped_dapo.item()
    # Negative advantages are clipped at 1 - clip_low from below (pessimistic bound).
    low, _ = clipped_surrogate(torch.tensor([[math.log(0.5)]]), old, -adv, mask, 0.2, 0.28)
    assert low.item() == pytest.approx(0.8)


def test_gradient_is_policy_gradient_at_ratio_one():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([[2.0, -1.0]])
    loss, _ = policy_loss(logp, logp.detach(), adv, torch.ones(1, 2), aggregation="token_mean")
    loss.backward()
    assert torch.allclose(logp.grad, -adv / 2)


def test_k3_kl_nonnegative_and_zero_at_equal():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(100, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64)
    # By hand: r = pi_ref / pi, k3 = r - log r - 1; positive wherever the two differ.
    expected = [math.exp(b - a) - (b - a) - 1 for a, b in zip(logp.tolist(), ref.tolist())]
    got = kl_k3(logp, ref)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.all(got > 0)
    assert torch.equal(kl_k3(logp, logp), torch.zeros(100, dtype=torch.float64))
    # Its expectation over tokens drawn from pi is KL(pi || pi_ref), not KL(pi_ref || pi).
    pi = torch.log_softmax(torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64), -1)
    pi_ref = torch.log_softmax(torch.tensor([-2.0, 0.0, 0.0, 0.0], dtype=torch.float64), -1)
    expectation = (pi.exp() * kl_k3(pi, pi_ref)).sum().item()
    forward = (pi.exp() * (pi - pi_ref)).sum().item()
    backward = (pi_ref.exp() * (pi_ref - pi)).sum().item()
    assert expectation == pytest.approx(forward, rel=1e-12) and abs(forward - backward) > 0.3


def test_kl_term_enters_loss():
    logp, ref = torch.zeros(1, 3), torch.full((1, 3), -0.5)
    base, _ = policy_loss(logp, logp, torch.zeros(1, 3), torch.ones(1, 3))
    with_kl, stats = policy_loss(logp, logp, torch.zeros(1, 3), torch.ones(1, 3), ref_logp=ref, kl_coef=0.1)
    expected = 0.1 * (math.exp(-0.5) + 0.5 - 1)
    assert (with_kl - base).item() == pytest.approx(expected, rel=1e-5)
    assert (stats["kl"] / stats["tokens"]).item() == pytest.approx(expected / 0.1, rel=1e-5)


def test_entropy_full_vocab_and_temperature():
    def token_entropy(logits, temperature=1.0):
        return log_softmax_and_entropy(logits, temperature)[1]

    logits = torch.zeros(1, 1, 8)
    assert token_entropy(logits).item() == pytest.approx(math.log(8), rel=1e-6)
    peaked = torch.tensor([[[4.0, 0.0, 0.0]]])
    assert token_entropy(peaked, 0.5).item() < token_entropy(peaked, 1.0).item() < token_entropy(peaked, 2.0).item()
    lp, _ = token_logprobs_and_entropy(peaked, torch.tensor([[0]]), temperature=2.0)
    assert lp.item() == pytest.approx(torch.log_softmax(peaked / 2.0, -1)[0, 0, 0].item())


def test_unknown_aggregation_names_options():
    with pytest.raises(ValueError, match="token_mean"):
        masked_aggregate(torch.ones(1, 1), torch.ones(1, 1), "mean")


def test_allowed_mask_renormalises_logprobs_and_entropy():
    from empg_rllib.core.choices import allowed_mask

    logits = torch.randn(2, 3, 6, requires_grad=True)
    allowed_ids = torch.tensor([[[1, 4, -1], [2, -1, -1], [-1, -1, -1]], [[0, 1, 5], [3, 4, -1], [5, -1, -1]]])
    mask = allowed_mask(allowed_ids, 6)
    assert mask[0, 2].all()  # all padding: unconstrained
    assert mask[0, 0].tolist() == [False, True, False, False, True, False]
    log_probs, entropy = log_softmax_and_entropy(logits, 1.0, mask)
    probs = log_probs.exp()
    assert torch.allclose(probs.sum(-1), torch.ones(2, 3))
    assert (probs[~mask] == 0).all()
    sub = torch.log_softmax(logits[0, 0, [1, 4]], -1)
    assert torch.allclose(log_probs[0, 0, [1, 4]], sub)
    assert entropy[0, 0].item() == pytest.approx(-(sub.exp() * sub).sum().item(), abs=1e-6)
    assert entropy[0, 1].item() == pytest.approx(0.0, abs=1e-7)  # one allowed token
    # Masked tokens must not put NaN into the gradient.
    (entropy.sum() + log_probs[0, 0, 1]).backward()
    assert torch.isfinite(logits.grad).all()
