"""What a rollout produces: turns, episodes, the requests that start them, and the counters of
a sampling call. Plain records shared by the sampler, the batch builder and the learner side;
no Ray, no engine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Turn:
    """One agent turn: the prompt it saw, what it sampled, and what the environment answered."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    entropies: list[float] | None  # the engine's (None from vLLM); EMPG uses the learner's unless reuse_sampler_scores
    finish_reason: str
    weights_version: int
    action: str  # what was sent to the environment
    format_error: str | None  # why the response did not parse, if it did not
    reward: float = 0.0
    invalid_action: bool = False
    allowed_token_ids: list[list[int]] | None = None  # constrained decoding: per sampled token


@dataclass
class Episode:
    """A finished conversation with one task."""

    task_id: str
    task_type: str
    seed: int
    group: Any = None
    turns: list[Turn] = field(default_factory=list)
    won: bool = False
    score: float = 0.0
    truncated: bool = False

    @property
    def reward(self) -> float:
        """The outcome reward EMPG learns from: the final score (1.0 for a win)."""
        return self.score


@dataclass(frozen=True)
class EpisodeRequest:
    """A task to play: `task` goes to reset's options (None: drawn from the seed)."""

    seed: int
    task: Any = None
    group: Any = None


class EnvFailure(RuntimeError):
    """An environment raised something other than `EnvCrashed`: its own error, an unknown env
    id, a bad env_config or split. A fresh environment would raise it again, so the run stops
    with this message, which names the environment and the cause."""


@dataclass
class RolloutStats:
    episodes: int = 0
    env_steps: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0  # each turn's whole prompt, whatever an engine's cache spared it
    env_crashes: int = 0  # EnvCrashed raised; every attempt counts
    crash_retries: int = 0  # episodes started again on a fresh environment after a crash
    crashed_episodes: int = 0  # episodes given up: their environment crashed on every attempt
    engine_batches: int = 0
    engine_seconds: float = 0.0
    env_seconds: float = 0.0  # summed over environments, which may step at the same time
    wall_seconds: float = 0.0


def whole_groups(
    requests: Sequence[EpisodeRequest], episodes: Sequence[Episode]
) -> tuple[list[Episode], list[Any]]:
    """The episodes of the groups that came back whole, and the groups that did not.

    A group trains whole or not at all: with a member missing (an episode given up after its
    environment crashed on every retry) its baseline would leave that rollout out, and the
    actions that crash an environment would never be penalised.
    """
    wanted = Counter(r.group for r in requests)
    played = Counter(e.group for e in episodes)
    dropped = [group for group, count in wanted.items() if played[group] != count]
    gone = set(dropped)
    return [e for e in episodes if e.group not in gone], dropped
