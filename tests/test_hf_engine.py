"""The HF inference engine against a teacher-forced forward pass of the same weights."""

from __future__ import annotations

import pytest
import torch

from empg_rllib.core.scoring import score_responses
from empg_rllib.sampling.engines.base import SamplingParams
from empg_rllib.sampling.engines.hf import HFEngine


@pytest.fixture(scope="module")
def engine(tiny_model):
    tokenizer, model = tiny_model
    return HFEngine(model, tokenizer, seed=0)


def _prompts(tokenizer):
    text = tokenizer.encode("You are in a room. Your task is to put a mug in the fridge, then search[red shoes] and buy.")
    return [text[:n] for n in (1, 4, 9, 17)]


def test_logprobs_and_entropies_match_teacher_forcing(engine):
    prompts = _prompts(engine.tokenizer)
    assert len({len(p) for p in prompts}) == len(prompts)  # mixed prompt lengths -> left padding
    for temperature in (1.0, 0.7):
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=24, temperature=temperature, seed=5, stop=()))
        logp, entropy = score_responses(engine.model, prompts, [o.token_ids for o in outs], engine.pad_token_id, temperature)
        for out, ref_lp, ref_h in zip(outs, logp, entropy):
            assert len(out.token_ids) == len(out.logprobs) == len(out.entropies) > 0
            assert max(abs(a - b) for a, b in zip(out.logprobs, ref_lp)) < 1e-5
            assert max(abs(a - b) for a, b in zip(out.entropies, ref_h)) < 1e-4


def test_padding_does_not_change_a_sequence(engine):
    prompts = _prompts(engine.tokenizer)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=1, stop=())
    alone = engine.generate(prompts[:1], params)[0]
    batched = engine.generate(prompts, params)[0]
    logp, _ = score_responses(engine.model, prompts[:1], [batched.token_ids], engine.pad_token_id)
    assert max(abs(a - b) for a, b in zip(batched.logprobs, logp[0])) < 1e-5
    assert len(alone.token_ids) == 8


def test_seeded_sampling_is_reproducible(engine):
    prompts = _prompts(engine.tokenizer)
    params = SamplingParams(max_new_tokens=12, seed=123, stop=())
    a, b = engine.generate(prompts, params), engine.generate(prompts, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    c = engine.generate(prompts, SamplingParams(max_new_tokens=12, seed=124, stop=()))
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


class ScriptedLM(torch.nn.Module):
    """Stands in for the LM's output only: row r emits plans[r][i] at its i-th sampled position,
    with all probability mass on it, so the engine's stop logic can be checked exactly."""

    def __init__(self, plans, vocab_size):
        super().__init__()
        self.plans, self.vocab_size, self.calls = plans, vocab_size, 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True, **_):
        i = self.calls
        self.calls += 1
        logits = torch.full((input_ids.shape[0], input_ids.shape[1], self.vocab_size), -1e4)
        for row, plan in enumerate(self.plans):
            logits[row, -1, plan[min(i, len(plan) - 1)]] = 0.0
        return type("Out", (), {"logits": logits, "past_key_values": None})()


def test_stops_on_stop_string_eos_and_length(tiny_model):
    tokenizer, _ = tiny_model
    eos = tokenizer.eos_token_id
    filler = tokenizer.encode(" go")
    answer = tokenizer.encode("<action>go</action>")
    plans = [answer + filler * 5, filler * 2 + [eos] + filler * 5, filler * 20]
    engine = HFEngine(ScriptedLM(plans, len(tokenizer)), tokenizer)
    stop_row, eos_row, length_row = engine.generate([[eos]] * 3, SamplingParams(max_new_tokens=10))
    assert stop_row.finish_reason == "stop" and stop_row.token_ids == answer
    assert stop_row.text == "<action>go</action>"
    assert eos_row.finish_reason == "eos" and eos_row.token_ids == filler * 2 + [eos]
    assert length_row.finish_reason == "length" and len(length_row.token_ids) == 10
    assert all(abs(lp) < 1e-3 for lp in stop_row.logprobs)  # all mass on the planned token


def test_update_weights_changes_outputs_and_version(tiny_model):
    tokenizer, model = tiny_model
    engine = HFEngine(type(model)(model.config), tokenizer, seed=0)
    engine.update_weights(model.state_dict())
    assert engine.weights_version == 1
    prompt = [tokenizer.encode("look around")]
    params = SamplingParams(max_new_tokens=6, seed=9, stop=())
    before = engine.generate(prompt, params)[0]
    assert before.weights_version == 1
    ref, _ = score_responses(model, prompt, [before.token_ids], engine.pad_token_id)
    assert max(abs(a - b) for a, b in zip(before.logprobs, ref[0])) < 1e-5
    perturbed = {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}
    engine.update_weights(perturbed, version=7)
    after = engine.generate(prompt, params)[0]
    assert engine.weights_version == 7 and after.weights_version == 7
    assert after.logprobs != before.logprobs[: len(after.logprobs)]
    with pytest.raises(RuntimeError):
        engine.update_weights({"nope": torch.zeros(1)})


def test_bad_sampling_params():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def _choices(tokenizer, actions):
    from empg_rllib.sampling.prompting import format_response

    return [tokenizer.encode(format_response(a, think=False), add_special_tokens=False) for a in actions]


def test_constrained_decoding_samples_only_choices_and_scores_like_the_learner(engine):
    prompts = _prompts(engine.tokenizer)
    actions = ["go to cabinet 1", "go to cabinet 2", "take apple 1 from countertop 1", "look", "inventory"]
    choices = _choices(engine.tokenizer, actions)
    # Row 1 is unconstrained: one batch mixes both kinds.
    per_row = [choices, None, choices[:2], choices[3:]]
    seen = set()
    for seed in range(6):
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=40, temperature=0.8, seed=seed), per_row)
        assert outs[1].allowed_token_ids is None
        for row in (0, 2, 3):
            out = outs[row]
            assert out.token_ids in per_row[row] and out.finish_reason == "stop"
            assert len(out.allowed_token_ids) == len(out.token_ids)
            assert all(t in allowed for t, allowed in zip(out.token_ids, out.allowed_token_ids))
            seen.add(out.text)
        logp, entropy = score_responses(
            engine.model, prompts, [o.token_ids for o in outs], engine.pad_token_id, 0.8,
            [o.allowed_token_ids for o in outs],
        )
        for out, ref_lp, ref_h in zip(outs, logp, entropy):
            assert max(abs(a - b) for a, b in zip(out.logprobs, ref_lp)) < 1e-5
            assert max(abs(a - b) for a, b in zip(out.entropies, ref_h)) < 1e-4
    assert len(seen) >= 3  # sampling, not a fixed pick
    # A forced token (one allowed id) has log-prob 0 and entropy 0; a free choice does not.
    out = engine.generate(prompts[:1], SamplingParams(max_new_tokens=40, seed=0), [choices])[0]
    forced = [i for i, a in enumerate(out.allowed_token_ids) if len(a) == 1]
    assert forced and all(abs(out.logprobs[i]) < 1e-6 and abs(out.entropies[i]) < 1e-6 for i in forced)
    assert any(len(a) > 1 and out.entropies[i] > 0 for i, a in enumerate(out.allowed_token_ids))


def test_constrained_decoding_rejects_bad_choices(engine):
    prompts = _prompts(engine.tokenizer)[:2]
    with pytest.raises(ValueError, match="choice lists for 2 prompts"):
        engine.generate(prompts, SamplingParams(), [None])
    with pytest.raises(ValueError, match="no empty choice"):
        engine.generate(prompts, SamplingParams(), [[[]], None])


def test_row_seeded_sampling_draws_each_token_with_its_probability_and_never_a_masked_one():
    from empg_rllib.sampling.engines.hf import _inverse_cdf

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).expand(4096, -1)
    uniforms = torch.cat([torch.rand(4093, 1, generator=torch.Generator().manual_seed(0)),
                          torch.tensor([[0.0], [0.9999999], [1.0 - 2**-24]])])
    tokens = _inverse_cdf(probs, uniforms).flatten()
    assert set(tokens.tolist()) <= {1, 3, 4} and tokens[-3:].tolist() == [1, 4, 4]
    counts = torch.bincount(tokens, minlength=6).float() / len(tokens)
    torch.testing.assert_close(counts[[1, 3, 4]], torch.tensor([0.5, 0.3, 0.2]), atol=0.03, rtol=0)


def _input_shapes(model):
    """A list that each forward pass appends the shape of its input ids to."""
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    return seen


def test_a_shared_prompt_prefix_is_computed_once_and_changes_nothing(tiny_model):
    tokenizer, model = tiny_model
    cached, plain = (HFEngine(type(model)(model.config), tokenizer, prefix_cache=on) for on in (True, False))
    for engine in (cached, plain):
        engine.update_weights(model.state_dict())
    assert cached.prefix_cache is not None and plain.prefix_cache is None
    shapes = _input_shapes(cached.model)
    system = tokenizer.encode("You are an agent in a household. Answer with one action in tags. " * 2)
    task = tokenizer.encode(" Your task is to put a mug in the fridge.")
    tails = [tokenizer.encode(t) for t in (" look", " go to the cabinet 1 now", " open it", " take the mug 1 from it")]
    actions = _choices(tokenizer, ["go to cabinet 1", "open fridge 1", "look"])
    batches = [
        [system + task + tail for tail in tails],  # a group: system prompt and task shared
        [system + tokenizer.encode(f" Task {i}: find a book.") + tails[i] for i in range(3)],  # the system prompt only
    ]
    for prompts in batches:
        for choices in (None, [actions, None, actions[:2], actions][: len(prompts)]):
            params = SamplingParams(max_new_tokens=10, temperature=0.9, seed=3, stop=())
            del shapes[:]
            got, want = cached.generate(prompts, params, choices), plain.generate(prompts, params, choices)
            assert [o.token_ids for o in got] == [o.token_ids for o in want]
            for a, b in zip(got, want):
                assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
                assert max(abs(x - y) for x, y in zip(a.entropies, b.entropies)) < 1e-5
            # The prefill (every pass of more than one position) computed the shared prefix at
            # most once and each row's tail after the system prompt: less than a full prefill.
            width = max(len(p) for p in prompts)
            prefill = sum(rows * positions for rows, positions in shapes if positions > 1)
            assert prefill <= width + len(prompts) * (width - len(system)) < len(prompts) * width
    assert cached.prefix_cache.tokens[: len(system)] == system
    # New weights: the cached prefix is recomputed, results follow the new weights.
    perturbed = {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}
    for engine in (cached, plain):
        engine.update_weights(perturbed)
    params = SamplingParams(max_new_tokens=10, seed=4, stop=())
    got, want = cached.generate(batches[0], params), plain.generate(batches[0], params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert max(abs(x - y) for a, b in zip(got, want) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
