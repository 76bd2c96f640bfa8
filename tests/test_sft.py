"""Behaviour cloning on expert demonstrations."""

from __future__ import annotations

import copy

import pytest

import envs
from empg_rllib.prompting import PromptConfig, parse_response
from empg_rllib.sft import collect_demonstrations, save_model, train_sft


@pytest.fixture(scope="module")
def demos(tiny_model):
    tokenizer, _ = tiny_model
    return collect_demonstrations(tokenizer, lambda: envs.make("deepsearch", max_turns=6), 6, PromptConfig(think=False), seed=3)


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


def test_no_demonstrations_is_an_error(tiny_model):
    tokenizer, model = tiny_model
    with pytest.raises(ValueError, match="no demonstrations"):
        train_sft(model, [], tokenizer.pad_token_id)
