"""Response-only, chunked scoring against the full-vocabulary, full-sequence computation."""

from __future__ import annotations

import pytest
import torch

from empg_rllib.core.scoring import position_ids, response_scores, response_width, scores_of_tokens


def full_scores(model, ids, mask, temperature, allowed_ids):
    """The computation response_scores replaces: logits at every position, prompt included."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, :-1]
    return scores_of_tokens(logits, ids[:, 1:], temperature, allowed_ids)


def batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows, width = 5, 14
    ids = torch.randint(5, vocab, (rows, width), generator=g)
    mask = torch.ones(rows, width, dtype=torch.long)
    resp = torch.zeros(rows, width - 1)
    for r, (pad, n) in enumerate([(0, 3), (2, 5), (4, 1), (1, 4), (3, 2)]):
        mask[r, :pad] = 0
        ids[r, :pad] = 0
        resp[r, width - 1 - n :] = 1
    # Constrained decoding on rows 0 and 3: allowed ids of the last 5 positions.
    allowed = torch.full((rows, 5, 3), -1, dtype=torch.long)
    allowed[0, -3:, 0] = ids[0, -3:]
    allowed[0, -3, 1:] = torch.tensor([7, 9])
    allowed[3, -4:, 0] = ids[3, -4:]
    allowed[3, -2, 1] = 11
    return ids, mask, resp, allowed


@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_response_scores_equal_the_full_computation(tiny_model, constrained, chunk):
    _, model = tiny_model
    vocab = model.config.vocab_size
    ids, mask, resp, allowed = batch(vocab)
    allowed = allowed if constrained else None
    with torch.no_grad():
        want_logp, want_entropy = full_scores(model, ids, mask, 0.7, allowed)
    logp, entropy = response_scores(model, ids, mask, resp, 0.7, allowed, chunk_tokens=chunk)
    on = resp > 0
    torch.testing.assert_close(logp[on], want_logp[on], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[on], want_entropy[on], rtol=1e-5, atol=1e-5)
    assert (logp[~on] == 0).all() and (entropy[~on] == 0).all()
    # The same gradient as the full computation; the entropy carries no graph.
    assert logp.requires_grad and not entropy.requires_grad
    weights = torch.randn(resp.shape, generator=torch.Generator().manual_seed(1)) * resp
    model.zero_grad()
    (logp * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    full_logp, _ = full_scores(model, ids, mask, 0.7, allowed)
    (full_logp * weights).sum().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, rtol=1e-3, atol=1e-5)
    model.zero_grad()


def test_response_width_and_an_empty_response():
    resp = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]], dtype=torch.float32)
    assert response_width(resp) == 2
    assert response_width(torch.zeros(2, 4)) == 0


def test_no_response_gives_zeros(tiny_model):
    _, model = tiny_model
    ids = torch.randint(5, 50, (2, 6))
    logp, entropy = response_scores(model, ids, torch.ones_like(ids), torch.zeros(2, 5))
    assert logp.shape == (2, 5) and not logp.any() and not entropy.any()
