"""Agent prompts and action parsing.

One prompt per turn: system prompt + a user message with the task, the last `history_turns`
(observation, action) pairs, the current observation and, where the environment gives them,
the admissible actions. Keeping only a window of history keeps the cost per turn flat on long
episodes. Prompts are returned as token ids; the ids the model samples are kept as sampled and
never re-encoded from text (re-tokenising decoded text does not give back the same tokens).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from empg_rllib.config.prompt import PromptConfig

ACTION_OPEN, ACTION_CLOSE = "<action>", "</action>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
#: The engine stops generating once this string has been produced.
STOP_STRING = ACTION_CLOSE

@dataclass(frozen=True)
class HistoryTurn:
    """One past turn as the prompt shows it: what the agent saw and the action it took."""

    observation: str
    action: str


@dataclass
class ParsedResponse:
    """The action in a model response, or why the turn is invalid."""

    action: str | None
    thought: str | None = None
    error: str | None = None

    @property
    def valid(self) -> bool:
        return self.action is not None


def format_instructions(config: PromptConfig) -> str:
    if config.think:
        return (
            "First reason step by step about the situation inside <think> </think>, then give "
            "exactly one action inside <action> </action>."
        )
    return "Give exactly one action inside <action> </action>."


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def user_message(
    task: str,
    observation: str,
    history: Sequence[HistoryTurn],
    admissible_actions: Sequence[str] | None,
    config: PromptConfig,
    turn: int,
) -> str:
    """The user message of one turn (task, recent history, observation, options, format)."""
    parts = [f"Your task is to: {task}"]
    recent = list(history)[-config.history_turns :] if config.history_turns else []
    if recent:
        first = turn - len(recent)
        lines = [
            f"[step {first + i + 1}] observation: {_clip(h.observation, config.max_observation_chars)}\n"
            f"[step {first + i + 1}] action: {h.action}"
            for i, h in enumerate(recent)
        ]
        parts.append(
            f"You have taken {turn} step(s). The most recent {len(recent)}:\n" + "\n".join(lines)
        )
    parts.append(f"Current observation (step {turn + 1}): {_clip(observation, config.max_observation_chars)}")
    if admissible_actions and config.list_admissible_actions:
        parts.append("Admissible actions: " + ", ".join(admissible_actions))
    parts.append(format_instructions(config))
    return "\n\n".join(parts)


def build_prompt_ids(
    tokenizer: Any,
    task: str,
    observation: str,
    history: Sequence[HistoryTurn] = (),
    admissible_actions: Sequence[str] | None = None,
    config: PromptConfig | None = None,
    turn: int | None = None,
) -> list[int]:
    """Chat-template token ids of the prompt for the next turn, ending with the assistant header."""
    config = config or PromptConfig()
    messages = [
        {"role": "system", "content": config.system_prompt},
        {
            "role": "user",
            "content": user_message(
                task,
                observation,
                history,
                admissible_actions,
                config,
                len(history) if turn is None else turn,
            ),
        },
    ]
    return chat_ids(tokenizer, messages)


def chat_ids(tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Sequence[Any] | None = None) -> list[int]:
    """The model's own chat template over `messages`, ending with the assistant header."""
    ids = tokenizer.apply_chat_template(list(messages), tools=tools, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding on newer transformers
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def format_response(action: str, thought: str | None = None, think: bool = True) -> str:
    """The response text an ideal agent writes (used for expert demonstrations)."""
    head = f"{THINK_OPEN}{thought or ''}{THINK_CLOSE}" if think else ""
    return f"{head}{ACTION_OPEN}{action}{ACTION_CLOSE}"


def action_choices(tokenizer: Any, actions: Sequence[str], cache: dict[str, list[int]]) -> list[list[int]]:
    """Token ids of the response `<action>a</action>` for each action: the completions that
    constrained decoding allows. `cache` keeps encodings across turns (the same actions recur)."""
    for action in actions:
        if action not in cache:
            cache[action] = tokenizer.encode(format_response(action, think=False), add_special_tokens=False)
    return [cache[a] for a in actions]


_TAG = re.compile(r"</?(?:action|think)>")
_END_TOKENS = ("<|im_end|>", "<|endoftext|>")


def parse_response(text: str, config: PromptConfig | None = None) -> ParsedResponse:
    """Extract the action from `<think>...</think><action>...</action>`.

    Invalid (action None, `error` says why): no action tags, an empty action, nested or repeated
    tags, an action over `max_action_chars`, text after `</action>`, and, when `think` is on,
    a missing or unclosed think block before the action.
    """
    config = config or PromptConfig()
    for end in _END_TOKENS:
        text = text.replace(end, "")
    start = text.find(ACTION_OPEN)
    end = text.find(ACTION_CLOSE)
    if start < 0 or end < 0:
        return ParsedResponse(None, error="missing <action>...</action> tags")
    if end < start:
        return ParsedResponse(None, error="</action> before <action>")
    if text.count(ACTION_OPEN) > 1 or text.count(ACTION_CLOSE) > 1:
        return ParsedResponse(None, error="more than one <action> tag")
    body = text[start + len(ACTION_OPEN) : end]
    if _TAG.search(body):
        return ParsedResponse(None, error="nested tag inside <action>")
    action = " ".join(body.split())
    if not action:
        return ParsedResponse(None, error="empty action")
    if len(action) > config.max_action_chars:
        return ParsedResponse(None, error=f"action longer than {config.max_action_chars} characters")
    if text[end + len(ACTION_CLOSE) :].strip():
        return ParsedResponse(None, error="text after </action>")

    head = text[:start]
    thought = None
    if THINK_OPEN in head or THINK_CLOSE in head:
        t0, t1 = head.find(THINK_OPEN), head.find(THINK_CLOSE)
        if t0 < 0 or t1 < t0 or head.count(THINK_OPEN) > 1 or head.count(THINK_CLOSE) > 1:
            return ParsedResponse(None, error="malformed <think> block")
        if head[t1 + len(THINK_CLOSE) :].strip():
            return ParsedResponse(None, error="text between </think> and <action>")
        thought = head[t0 + len(THINK_OPEN) : t1].strip()
    elif config.think:
        return ParsedResponse(None, error="missing <think>...</think> before the action")
    return ParsedResponse(action, thought=thought)


__all__ = [
    "STOP_STRING",
    "HistoryTurn",
    "ParsedResponse",
    "action_choices",
    "build_prompt_ids",
    "format_response",
    "parse_response",
    "user_message",
]
