"""The protocol every text environment in this package follows.

envs/ is framework-free: gymnasium only, no Ray, no empg_rllib. A caller sees
`reset(seed=..., options={"task": ...}) -> (obs, info)` and
`step(action_text) -> (obs, reward, terminated, truncated, info)` with the info keys
below, whatever engine sits underneath.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import threading
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
    #: Whether two instances may be made, reset, stepped or closed at the same time in one
    #: process (see `is_thread_safe`). Say so only when it holds: False serialises the calls.
    thread_safe: ClassVar[bool] = False

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


def is_thread_safe(factory: Any) -> bool:
    """Whether the environments `factory` (a class, or a callable with the attribute) makes may
    be called from several threads at once. One that does not say is not: game engines,
    simulators, C extensions and clients holding one socket often keep state shared between
    instances (TextWorld's grammar parser does), and a lock per instance would not cover it."""
    return getattr(factory, "thread_safe", False) is True


_CLASS_LOCKS: dict[Any, threading.RLock] = {}
_CLASS_LOCKS_GUARD = threading.Lock()


def env_lock(factory: Any) -> contextlib.AbstractContextManager:
    """The process-wide lock that every call into `factory`'s environments holds when they are
    not thread-safe (a no-op for those that are). A subclass shares the lock of the class that
    declared `thread_safe` (a subclass of ALFWorld's environment drives the same parser)."""
    if is_thread_safe(factory):
        return contextlib.nullcontext()
    key = factory
    if isinstance(factory, type):
        key = next((c for c in factory.__mro__ if "thread_safe" in vars(c) and c is not TextEnv), factory)
    with _CLASS_LOCKS_GUARD:
        return _CLASS_LOCKS.setdefault(key, threading.RLock())


class Serialized(gym.Wrapper):
    """Holds `lock` around every call into an environment that is not thread-safe, so that no
    two instances of its class run at once in this process while other threads (the engine,
    other environments, a wrapper's latency) go on. `empg_envs.make` adds it."""

    def __init__(self, env: gym.Env, lock: contextlib.AbstractContextManager) -> None:
        super().__init__(env)
        self._lock = lock

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        with self._lock:
            return self.env.reset(**kwargs)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        with self._lock:
            return self.env.step(action)

    def close(self) -> None:
        with self._lock:
            self.env.close()


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
