"""Env ids -> environment classes.

Built-in ids are registered below as `module:Class` strings so that importing `envs` does not
import every engine. Users add their own with `register(env_id, "pkg.module:Class")` in Python;
a YAML config may only name ids registered here (never an arbitrary import path), which keeps
experiment files from executing code.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any, Callable

import gymnasium as gym

from envs.core import EnvConfigError, EnvError, UnknownEnvError

EnvFactory = Callable[..., gym.Env]

_REGISTRY: dict[str, str | EnvFactory] = {}
# Ids whose suffix selects a variant: "twx/<game>" -> the TWX env with game=<game>.
_PREFIXES: dict[str, str | EnvFactory] = {}


def register(env_id: str, entry_point: str | EnvFactory, *, prefix: bool = False) -> None:
    """Register `entry_point` ("module:Class" or a callable) under `env_id`.

    With `prefix=True`, `env_id` must end in "/" and any id `env_id + name` makes the env with
    `variant=name`.
    """
    if prefix and not env_id.endswith("/"):
        raise ValueError(f"a prefix env id must end with '/', got {env_id!r}")
    if isinstance(entry_point, str) and ":" not in entry_point:
        raise ValueError(f"entry point must be 'module:Class', got {entry_point!r}")
    (_PREFIXES if prefix else _REGISTRY)[env_id] = entry_point


def list() -> list[str]:  # noqa: A001 - the protocol names it envs.list()
    """Known env ids; prefix ids are shown as 'twx/<game>'."""
    return sorted(_REGISTRY) + sorted(p + "<game>" for p in _PREFIXES)


def _resolve(entry_point: str | EnvFactory) -> EnvFactory:
    if callable(entry_point):
        return entry_point
    module_name, _, attr = entry_point.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _lookup(env_id: str, env_config: dict[str, Any]) -> tuple[str | EnvFactory, dict[str, Any]]:
    """The entry point of `env_id` and its keyword arguments (a prefix id adds its variant)."""
    if not isinstance(env_id, str):
        raise UnknownEnvError(f"env id must be a string, got {env_id!r}")
    if env_id in _REGISTRY:
        return _REGISTRY[env_id], dict(env_config)
    prefix = next((p for p in _PREFIXES if env_id.startswith(p) and len(env_id) > len(p)), None)
    if prefix is None:
        close = difflib.get_close_matches(env_id, list(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownEnvError(f"unknown env id {env_id!r}; known ids: {', '.join(list())}.{hint}")
    return _PREFIXES[prefix], {"variant": env_id[len(prefix):], **env_config}


def check_config(env_id: str, **env_config: Any) -> None:
    """Check `env_id` and `env_config` without making the environment (no engine, JVM or
    catalogue starts), so that a run can refuse a bad setting before it starts workers.

    Raises UnknownEnvError for an unregistered id, EnvConfigError for a keyword the
    environment does not take or a value its `check_config` classmethod rejects, and EnvError
    when the environment's module cannot be imported. Values that only the running engine can
    judge are checked when the environment is made.
    """
    entry_point, kwargs = _lookup(env_id, env_config)
    try:
        factory = _resolve(entry_point)
    except ImportError as err:
        raise EnvError(f"env {env_id!r} cannot be loaded: {err}") from err
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        takes = [name for name, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [key for key in kwargs if key not in takes]
        if unknown:
            raise EnvConfigError(
                f"env {env_id!r}: bad env_config key {unknown[0]!r}; it takes: {', '.join(takes)}"
            )
    check = getattr(factory, "check_config", None)
    if callable(check):
        check(**kwargs)


def make(env_id: str, **env_config: Any) -> gym.Env:
    """Make the environment `env_id` with `env_config` as keyword arguments."""
    entry_point, kwargs = _lookup(env_id, env_config)
    factory = _resolve(entry_point)
    try:
        return factory(**kwargs)
    except TypeError as err:
        # An unknown keyword in env_config surfaces here; name it instead of a bare TypeError.
        if "unexpected keyword argument" in str(err):
            raise EnvConfigError(f"env {env_id!r}: bad env_config key: {err}") from err
        raise


def expert_action(env: gym.Env) -> str:
    """The expert's next action for `env` (any wrapper depth)."""
    return env.unwrapped.expert_action()
