"""Agents written against the OpenAI chat API alone: its own prompt, its own history, its
own parsing. Nothing here knows about empg-rllib beyond the shape of `task` (an instruction, an
observation, the admissible actions and an async `step`; a dataset's task record as `data`)."""

from __future__ import annotations

import re
from typing import Any

SYSTEM = (
    "You act in a text-based household. Each reply has two lines:\n"
    "Thought: <one short sentence>\n"
    "Action: <one command from the admissible actions>"
)
ACTION = re.compile(r"Action:\s*(.+)", re.IGNORECASE)


def parse_action(text: str) -> str:
    """The command after 'Action:', else the reply's last non-empty line."""
    found = ACTION.search(text)
    if found:
        return found.group(1).strip().splitlines()[0].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "look"


def observe(observation: str, actions: list[str] | None) -> str:
    listed = f"\nAdmissible actions: {', '.join(actions)}" if actions else ""
    return f"Observation: {observation}{listed}"


async def run(task: Any, client: Any, *, max_tokens: int = 48, history: int = 3, max_steps: int = 50) -> float:
    """Play `task` to its end; the reward is the environment's final score."""
    opening = {"role": "user", "content": f"Task: {task.instruction}\n{observe(task.observation, task.admissible_actions)}"}
    exchanges: list[dict[str, str]] = []
    for _ in range(max_steps):
        messages = [{"role": "system", "content": SYSTEM}, opening, *exchanges[-2 * history:]]
        reply = await client.chat.completions.create(model="policy", messages=messages, max_tokens=max_tokens)
        text = reply.choices[0].message.content or ""
        observation, _, done, info = await task.step(parse_action(text))
        exchanges += [{"role": "assistant", "content": text},
                      {"role": "user", "content": observe(observation, info.get("admissible_actions"))}]
        if done:
            break
    return task.score


# A task dataset of the package's own and a one-call agent for it: no environment to step, the
# agent scores its answer itself.


def arithmetic_tasks(split: str) -> list[dict[str, Any]]:
    """Sums of two numbers; eval_seen repeats the first training tasks, eval_unseen has larger numbers."""
    pairs = {"train": [(a, b) for a in range(2, 22) for b in range(3, 13)]}
    pairs["eval_seen"] = pairs["train"][:24]
    pairs["eval_unseen"] = [(a, b) for a in range(40, 46) for b in range(20, 24)]
    return [{"task_id": f"sum-{split}-{a}-{b}", "task_type": "sum", "instruction": f"What is {a} + {b}?",
             "answer": a + b} for a, b in pairs.get(split, [])]


NUMBER = re.compile(r"-?\d+")


async def answer(task: Any, client: Any, *, max_tokens: int = 12) -> float:
    """One call; 1.0 when the reply's first number is the task's answer."""
    reply = await client.chat.completions.create(
        model="policy", max_tokens=max_tokens,
        messages=[{"role": "system", "content": "Reply with the number only."},
                  {"role": "user", "content": task.instruction}])
    found = NUMBER.search(reply.choices[0].message.content or "")
    return float(found is not None and int(found.group()) == task.data["answer"])
