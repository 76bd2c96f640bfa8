"""Behaviour cloning on expert demonstrations."""

from __future__ import annotations

import copy

import pytest
import torch

import empg_envs
from empg_rllib.config.loading import validate
from empg_rllib.config.prompt import PromptConfig
from empg_rllib.core.choices import allowed_tensor
from empg_rllib.core.scoring import left_pad, position_ids, scores_of_tokens
from empg_rllib.sampling.prompting import parse_response
from empg_rllib.workflows.sft import (
    Demonstration,
    action_probabilities,
    allowed_along,
    collect_demonstrations,
    run_sft,
    save_model,
    train_sft,
)


@pytest.fixture(scope="module")
def demos(tiny_model):
    tokenizer, _ = tiny_model
    return collect_demonstrations(tokenizer, lambda: empg_envs.make("deepsearch", max_turns=6), 6, PromptConfig(think=False), seed=3)


def test_demonstrations_are_expert_turns_in_the_agent_format(tiny_model, demos):
    tokenizer, _ = tiny_model
    turns, expert_success = demos
    assert expert_success == 1.0 and len(turns) >= 6
    for d in turns:
        text = tokenizer.decode(d.response_ids)
        parsed = parse_response(text, PromptConfig(think=False))
        assert parsed.valid and parsed.action.startswith(("search[", "answer["))
        assert tokenizer.decode(d.prompt_ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("prompt_loss_weight", [0.0, 0.5])
def test_training_lowers_the_response_loss(tiny_model, demos, prompt_loss_weight, tmp_path):
    tokenizer, model = tiny_model
    model = copy.deepcopy(model)
    losses = train_sft(model, demos[0], tokenizer.pad_token_id, epochs=4, lr=3e-3, batch_size=8, prompt_loss_weight=prompt_loss_weight)
    assert losses[-1] < 0.8 * losses[0]
    path = save_model(model, tokenizer, tmp_path / "sft")
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists()


def test_an_expert_that_never_wins_is_named_before_training(model_path, tmp_path):
    # The deep-search expert needs a search before its answer: one turn is never enough.
    exp = validate({"env": "deepsearch", "model": str(model_path), "max_turns": 1, "sft": {"episodes": 2}})
    with pytest.raises(ValueError, match="won none of its 2 deepsearch episodes within max_turns=1"):
        run_sft(exp, tmp_path / "sft")


def test_no_demonstrations_is_an_error(tiny_model):
    tokenizer, model = tiny_model
    with pytest.raises(ValueError, match="no demonstrations"):
        train_sft(model, [], tokenizer.pad_token_id)


def test_allowed_along_follows_the_choice_trie():
    choices = [[1, 2, 3], [1, 2, 4, 5], [6]]
    assert allowed_along(choices, [1, 2, 4, 5]) == [[1, 6], [2], [3, 4], [5]]
    assert allowed_along(choices, [6]) == [[1, 6]]
    assert allowed_along(choices, [1, 2]) is None  # not a whole choice
    assert allowed_along(choices, [7]) is None


@pytest.fixture(scope="module")
def constrained_demos(tiny_model):
    pytest.importorskip("alfworld")
    tokenizer, _ = tiny_model
    config = PromptConfig(think=False, history_turns=1, list_admissible_actions=False)
    make = lambda: empg_envs.make("alfworld", max_turns=20, expert="explorer", task_types=["pick_and_place_simple"])  # noqa: E731
    return collect_demonstrations(tokenizer, make, 2, config, seed=1, constrain_actions=True)


def test_constrained_demonstrations_train_the_constrained_policy(tiny_model, constrained_demos):
    tokenizer, model = tiny_model
    turns, success = constrained_demos
    assert success == 1.0 and turns
    for d in turns:
        assert d.allowed is not None and len(d.allowed) == len(d.response_ids)
        assert all(t in a for t, a in zip(d.response_ids, d.allowed))
        assert "Admissible actions" not in tokenizer.decode(d.prompt_ids)
    model = copy.deepcopy(model)
    losses = train_sft(model, turns, tokenizer.pad_token_id, epochs=4, lr=3e-3, batch_size=8)
    # Forced tokens cost nothing under the constraint, so even the first epoch is far below
    # the ~7.5 nats/token of an untrained model over the full vocabulary.
    assert losses[0] < 2.0 and losses[-1] < 0.8 * losses[0]


def test_action_probabilities_per_verb_rise_with_training(tiny_model, constrained_demos):
    tokenizer, model = tiny_model
    turns, _ = constrained_demos
    verbs = {d.action.split()[0] for d in turns}
    assert {"go", "take", "move"} <= verbs
    before = action_probabilities(model, turns, tokenizer.pad_token_id)
    assert set(before) == verbs | {"all"} and all(0 < p < 1 for p in before.values())
    trained = copy.deepcopy(model)
    train_sft(trained, turns, tokenizer.pad_token_id, epochs=4, lr=3e-3, batch_size=8)
    after = action_probabilities(trained, turns, tokenizer.pad_token_id)
    assert after["all"] > before["all"] + 0.1
    # A response whose every token is the only one allowed is certain under the constraint.
    forced = Demonstration(turns[0].prompt_ids, turns[0].response_ids, "x", [[t] for t in turns[0].response_ids], "go to x")
    assert action_probabilities(model, [forced], tokenizer.pad_token_id) == pytest.approx({"all": 1.0, "go": 1.0})


@pytest.mark.heavy  # builds the tiny model (the experiment's default `tiny:`) and trains it
def test_cli_sft_saves_the_model_and_reports_held_out_action_probabilities(tmp_path, capsys):
    from empg_rllib.cli import main

    experiment = tmp_path / "x.yaml"
    experiment.write_text(
        "name: sft-test\nenv: deepsearch\nmax_turns: 6\nthink: false\n"
        f"run_dir: {tmp_path / 'runs'}\n"
        "sft: {episodes: 4, epochs: 1, batch_size: 8, heldout_episodes: 2, heldout_split: eval_unseen}\n"
    )
    assert main(["sft", str(experiment), "--out", str(tmp_path / "model")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert (tmp_path / "model" / "config.json").exists()
    assert "P(expert action) on 2 eval_unseen expert episodes: all " in out
    assert "search " in out and "answer " in out


def test_response_only_loss_equals_the_full_logits_loss(tiny_model, constrained_demos):
    """SFT without prompt loss computes the LM head at response positions only: at lr 0 and
    one batch, its loss is the full computation's (logits at every position)."""
    tokenizer, model = tiny_model
    turns = constrained_demos[0][:8]
    ids, mask = left_pad([d.prompt_ids + d.response_ids for d in turns], tokenizer.pad_token_id)
    response = torch.zeros(ids.shape[0], ids.shape[1] - 1)
    for row, d in enumerate(turns):
        response[row, -len(d.response_ids) :] = 1.0
    allowed = allowed_tensor([d.allowed for d in turns], max(len(d.response_ids) for d in turns))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, :-1]
        want = float(-(scores_of_tokens(logits, ids[:, 1:], 1.0, allowed)[0] * response).sum() / response.sum())
    [loss] = train_sft(copy.deepcopy(model), turns, tokenizer.pad_token_id, epochs=1, lr=0.0, batch_size=len(turns))
    assert loss == pytest.approx(want, rel=1e-5)
