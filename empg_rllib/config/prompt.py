"""How prompts are built and responses parsed: the settings only.

The schema (`config.schema.Experiment.prompt_config`) builds one; the sampler
(`sampling.prompting`) uses it. Kept apart so that the schema never imports the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SYSTEM_PROMPT = "You are an agent that solves tasks in a text environment, one action per turn."


@dataclass(frozen=True)
class PromptConfig:
    """How prompts are built and responses parsed."""

    history_turns: int = 2
    think: bool = True  # ask for <think>...</think> before the action
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_action_chars: int = 200
    list_admissible_actions: bool = True
    max_observation_chars: int = 2000

    def __post_init__(self) -> None:
        if self.history_turns < 0:
            raise ValueError(f"history_turns must be >= 0, got {self.history_turns}")
        if self.max_action_chars < 1:
            raise ValueError(f"max_action_chars must be >= 1, got {self.max_action_chars}")
