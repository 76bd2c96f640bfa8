"""Prompt construction and response parsing."""

from __future__ import annotations

import pytest

from empg_rllib.config.prompt import PromptConfig
from empg_rllib.sampling.prompting import (
    HistoryTurn,
    build_prompt_ids,
    format_response,
    parse_response,
    user_message,
)


@pytest.mark.parametrize(
    "text, action",
    [
        ("<think>go get it</think><action>go to desk 1</action>", "go to desk 1"),
        ("<think></think> <action>  take  apple 1 </action>\n", "take apple 1"),
        ("<think>x</think><action>search[red shoes]</action><|im_end|>", "search[red shoes]"),
    ],
)
def test_valid_responses(text, action):
    parsed = parse_response(text)
    assert parsed.valid and parsed.action == action and parsed.error is None


@pytest.mark.parametrize(
    "text, error",
    [
        ("go to desk 1", "missing <action>"),
        ("<think>a</think><action>   </action>", "empty"),
        ("<think>a</think><action>go <action>x</action></action>", "more than one"),
        ("<think>a</think><action>go <think>x</think></action>", "nested"),
        ("<think>a</think><action>" + "x" * 300 + "</action>", "longer than 200"),
        ("<think>a</think><action>look</action> and then more", "after </action>"),
        ("<action>look</action>", "missing <think>"),
        ("<think>a<action>look</action>", "malformed <think>"),
        ("</action>look<action>", "before <action>"),
    ],
)
def test_invalid_responses(text, error):
    parsed = parse_response(text)
    assert not parsed.valid and error in parsed.error


def test_thinking_optional_by_config():
    assert parse_response("<action>look</action>", PromptConfig(think=False)).action == "look"
    assert parse_response("<think>hm</think><action>look</action>", PromptConfig(think=False)).thought == "hm"


def test_format_response_round_trips():
    for think in (True, False):
        config = PromptConfig(think=think)
        assert parse_response(format_response("open fridge 1", "it is cold", think), config).action == "open fridge 1"


def test_history_window_keeps_last_turns_only():
    history = [HistoryTurn(f"obs {i}", f"act {i}") for i in range(5)]
    text = user_message("find it", "obs now", history, ["look", "go north"], PromptConfig(history_turns=2), 5)
    assert "act 4" in text and "act 3" in text and "act 2" not in text
    assert "[step 5] action: act 4" in text and "step 6" in text
    assert "Admissible actions: look, go north" in text
    assert "<think>" in text
    no_history = user_message("find it", "obs now", history, None, PromptConfig(history_turns=0), 5)
    assert "act 4" not in no_history and "Admissible" not in no_history


def test_prompt_is_chat_template_token_ids(tiny_model):
    tokenizer, _ = tiny_model
    ids = build_prompt_ids(tokenizer, "put a mug on desk", "You are in a room.", admissible_actions=["look"])
    assert all(isinstance(i, int) for i in ids)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "put a mug on desk" in text


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="history_turns"):
        PromptConfig(history_turns=-1)
