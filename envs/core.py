"""The protocol every text environment in this package follows.

envs/ is framework-free: gymnasium only, no Ray, no empg_rllib. A caller sees
`reset(seed=..., options={"task": ...}) -> (obs, info)` and
`step(action_text) -> (obs, reward, terminated, truncated, info)` with the info keys
below, whatever engine sits underneath.
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import Any, ClassVar

import gymnasium as gym

SPLITS: tuple[str, ...] = ("train", "eval_seen", "eval_unseen")

#: Keys every `reset` info carries.
RESET_INFO_KEYS: tuple[str, ...] = (
    "task_id",
    "task_type",
    "instruction",
    "admissible_actions",
)
#: Keys every `step` info carries (plus the reset keys).
STEP_INFO_KEYS: tuple[str, ...] = ("won", "score", "invalid_action")


class EnvError(Exception):
    """Base class of errors raised by environments of this package."""


class UnknownEnvError(EnvError, KeyError):
    """An env id that is not registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class EnvConfigError(EnvError, ValueError):
    """A bad env_config value; the message names the key."""


class EnvCrashed(EnvError, RuntimeError):
    """The engine behind an environment died (JVM, planner, server).

    The environment is unusable afterwards; recover by making a new one with `empg_envs.make`.
    """


class TextEnv(gym.Env):
    """Base class: text observations, text actions, turn limit, common info keys.

    Subclasses implement `_reset_task(seed, task)` and `_step(action)`; this class handles the
    turn counter, truncation at `max_turns`, and fills the protocol's info keys.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}
    #: Task types this environment generates (used for per-type metrics).
    task_types: ClassVar[tuple[str, ...]] = ()
    #: Names the environment's text uses (objects, places), whether or not a given episode
    #: shows them: a tokenizer trained for the environment learns them as whole tokens.
    lexicon: ClassVar[tuple[str, ...]] = ()

    def __init__(self, max_turns: int = 50, split: str = "train") -> None:
        self.check_config(max_turns=max_turns, split=split)
        self.max_turns = max_turns
        self.split = split
        self.observation_space = gym.spaces.Text(max_length=1 << 20)
        self.action_space = gym.spaces.Text(max_length=1 << 12)
        self._turn = 0
        self._task_info: dict[str, Any] = {}
        self._done = False

    @classmethod
    def check_config(cls, **env_config: Any) -> None:
        """Check the env_config values given, starting nothing (no engine, JVM or catalogue).

        Raises EnvConfigError naming the key. `empg_envs.check_config` calls this before a run
        starts, so that a typo fails at once and not inside a worker; a subclass extends it
        with its own cheap checks. Keys that are absent are not checked.
        """
        if "max_turns" in env_config:
            max_turns = env_config["max_turns"]
            if not isinstance(max_turns, int) or max_turns < 1:
                raise EnvConfigError(f"max_turns must be a positive int, got {max_turns!r}")
        if "split" in env_config and env_config["split"] not in SPLITS:
            raise EnvConfigError(f"split must be one of {SPLITS}, got {env_config['split']!r}")

    # ---- to implement -------------------------------------------------------------------
    def _reset_task(self, seed: int | None, task: Any) -> tuple[str, dict[str, Any]]:
        """Start a task; return the first observation and an info with RESET_INFO_KEYS."""
        raise NotImplementedError

    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        """Apply one action; return (obs, reward, terminated, info with STEP_INFO_KEYS)."""
        raise NotImplementedError

    def expert_action(self) -> str:
        """The action an expert takes from the current state."""
        raise NotImplementedError

    # ---- gymnasium API --------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        task = (options or {}).get("task")
        obs, info = self._reset_task(seed, task)
        missing = [k for k in RESET_INFO_KEYS if k not in info]
        if missing:
            raise EnvError(f"{type(self).__name__}._reset_task info lacks {missing}")
        self._task_info = {k: info[k] for k in ("task_id", "task_type", "instruction")}
        self._turn = 0
        self._done = False
        info.setdefault("won", False)
        info.setdefault("score", 0.0)
        info.setdefault("invalid_action", False)
        info["turn"] = 0
        return obs, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if not self._task_info:
            raise EnvError("step() called before reset()")
        if self._done:
            raise EnvError("step() called after the episode ended; call reset()")
        if not isinstance(action, str):
            raise TypeError(f"action must be a str, got {type(action).__name__}")
        obs, reward, terminated, info = self._step(action)
        missing = [k for k in STEP_INFO_KEYS if k not in info]
        if missing:
            raise EnvError(f"{type(self).__name__}._step info lacks {missing}")
        self._turn += 1
        truncated = not terminated and self._turn >= self.max_turns
        self._done = terminated or truncated
        info.update(self._task_info)
        info.setdefault("admissible_actions", None)
        info["turn"] = self._turn
        return obs, float(reward), bool(terminated), bool(truncated), info


class StepLatency(gym.Wrapper):
    """Adds `latency_ms` to every step, as a slow tool or remote service would. The wait
    releases the GIL, like the I/O of a real remote environment."""

    def __init__(self, env: gym.Env, latency_ms: float) -> None:
        super().__init__(env)
        self.latency_s = latency_ms / 1000.0

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        time.sleep(self.latency_s)
        return self.env.step(action)


def cache_dir(name: str) -> pathlib.Path:
    """A per-environment cache folder: $EMPG_CACHE_DIR/<name> (default ~/.cache/empg-rllib)."""
    root = os.environ.get("EMPG_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "empg-rllib"
    )
    path = pathlib.Path(root) / name
    path.mkdir(parents=True, exist_ok=True)
    return path
