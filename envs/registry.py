"""Env ids -> environment classes.

Built-in ids are registered below as `module:Class` strings so that importing `envs` does not
import every engine. An installed package adds its own through the entry-point group
`empg_rllib.envs` (name = env id, value = "module:Class"; a name ending in "/" is a prefix id):
they are read when an id is not found here, in whatever process looks it up, so the driver and
every remote env runner on every node see the same ids as long as the package is importable
there. `register(env_id, "pkg.module:Class")` from Python reaches only the process that calls
it. A YAML config may only name ids known here (never an arbitrary import path), which keeps
experiment files from executing code.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import gymnasium as gym

from empg_envs.core import EnvConfigError, EnvError, Serialized, StepLatency, UnknownEnvError, env_lock, is_thread_safe

EnvFactory = Callable[..., gym.Env]

#: The entry-point group through which installed packages register environment ids.
ENTRY_POINT_GROUP = "empg_rllib.envs"

#: What an id maps to: "module:Class", a callable, or an installed package's entry point
#: (imported when the environment is first checked or made).
Registration = str | EnvFactory | importlib.metadata.EntryPoint

_REGISTRY: dict[str, Registration] = {}
# Ids whose suffix selects a variant: "twx/<game>" -> the TWX env with game=<game>.
_PREFIXES: dict[str, Registration] = {}
# How `list()` shows a prefix id's variant: "twx/<game>".
_PLACEHOLDERS: dict[str, str] = {}


def register(env_id: str, entry_point: Registration, *, prefix: bool = False, variant: str = "variant") -> None:
    """Register `entry_point` ("module:Class", a callable, or an installed package's entry
    point) under `env_id`, in this process only: remote env runners do not see it (an
    installed package's `empg_rllib.envs` entry point reaches every process).

    With `prefix=True`, `env_id` must end in "/" and any id `env_id + name` makes the env with
    `variant=name`; `list()` shows it as `env_id + "<variant>"`, named by `variant`.
    """
    if prefix and not env_id.endswith("/"):
        raise ValueError(f"a prefix env id must end with '/', got {env_id!r}")
    target = _target(entry_point) if not callable(entry_point) else None
    if target is not None and ":" not in target:
        raise ValueError(f"entry point must be 'module:Class', got {target!r}")
    (_PREFIXES if prefix else _REGISTRY)[env_id] = entry_point
    if prefix:
        _PLACEHOLDERS[env_id] = f"<{variant}>"


def load_entry_points() -> None:
    """Register the ids that installed packages declare in the `empg_rllib.envs` entry-point
    group. Read afresh on every call (a scan of the installed distributions, no import), so a
    package made importable after the first lookup is still found. An id that an entry point
    and an earlier registration give different classes is an error naming both: silently
    preferring one would train on an environment the experiment file did not mean."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        prefix = ep.name.endswith("/")
        table = _PREFIXES if prefix else _REGISTRY
        known = table.get(ep.name)
        if known is None:
            register(ep.name, ep, prefix=prefix)
        elif _target(known) != ep.value:
            source = ep.dist.name if ep.dist is not None else "an installed package"
            raise EnvError(
                f"env id {ep.name!r} is registered as {_target(known)!r} and again by {source} "
                f"(entry point group {ENTRY_POINT_GROUP!r}) as {ep.value!r}; rename one of them"
            )


def unknown_id(what: str, name: str, known: Iterable[str], group: str, spell: Callable[[str], str] = repr) -> str:
    """The message for `name`, a `what` id that is not registered: the closest known one (as
    `spell` writes it), every known one, and the entry-point group through which packages add
    more."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {spell(close[0])}?" if close else ""
    return (f"unknown {what} {name!r}{hint} (known: {', '.join(known) or 'none installed'}; packages add "
            f"{what}s through the entry-point group {group!r})")


def _target(entry_point: Registration) -> str:
    """The "module:Class" an entry point names (a callable's qualified name)."""
    if isinstance(entry_point, importlib.metadata.EntryPoint):
        return entry_point.value
    if isinstance(entry_point, str):
        return entry_point
    return f"{entry_point.__module__}:{entry_point.__qualname__}"


def list() -> list[str]:  # noqa: A001 - the protocol names it empg_envs.list()
    """Known env ids, installed packages' included; prefix ids are shown as 'twx/<game>'."""
    load_entry_points()
    return sorted(_REGISTRY) + sorted(p + _PLACEHOLDERS.get(p, "<variant>") for p in _PREFIXES)


def _resolve(entry_point: Registration) -> EnvFactory:
    if isinstance(entry_point, importlib.metadata.EntryPoint):
        return entry_point.load()
    if callable(entry_point):
        return entry_point
    module_name, _, attr = entry_point.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _find(env_id: str) -> tuple[str | None, str | None]:
    """(`env_id` itself if registered, else the prefix id it extends), None where neither."""
    if env_id in _REGISTRY:
        return env_id, None
    return None, next((p for p in _PREFIXES if env_id.startswith(p) and len(env_id) > len(p)), None)


def _lookup(env_id: str, env_config: dict[str, Any]) -> tuple[Registration, dict[str, Any]]:
    """The entry point of `env_id` and its keyword arguments (a prefix id adds its variant).
    Installed packages' entry points are read only when the id is not known yet: built-in ids
    never pay for the scan."""
    if not isinstance(env_id, str):
        raise UnknownEnvError(f"env id must be a string, got {env_id!r}")
    exact, prefix = _find(env_id)
    if exact is None and prefix is None:
        load_entry_points()
        exact, prefix = _find(env_id)
    if exact is not None:
        return _REGISTRY[exact], dict(env_config)
    if prefix is None:
        close = difflib.get_close_matches(env_id, list(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownEnvError(f"unknown env id {env_id!r}; known ids: {', '.join(list())}.{hint}")
    return _PREFIXES[prefix], {"variant": env_id[len(prefix):], **env_config}


#: The env_config key every environment takes: milliseconds of latency added to each step (a
#: slow tool or remote service, to measure how the sampler copes with one).
STEP_LATENCY_KEY = "step_latency_ms"


def _pop_latency(env_id: str, env_config: dict[str, Any]) -> float:
    latency = env_config.pop(STEP_LATENCY_KEY, 0)
    if isinstance(latency, bool) or not isinstance(latency, (int, float)) or not latency >= 0:
        raise EnvConfigError(f"env {env_id!r}: {STEP_LATENCY_KEY} must be a number >= 0, got {latency!r}")
    return float(latency)


def check_config(env_id: str, **env_config: Any) -> None:
    """Check `env_id` and `env_config` without making the environment (no engine, JVM or
    catalogue starts), so that a run can refuse a bad setting before it starts workers.

    Raises UnknownEnvError for an unregistered id, EnvConfigError for a keyword the
    environment does not take or a value its `check_config` classmethod rejects, and EnvError
    when the environment's module cannot be imported. Values that only the running engine can
    judge are checked when the environment is made.
    """
    _pop_latency(env_id, env_config)
    entry_point, kwargs = _lookup(env_id, env_config)
    try:
        factory = _resolve(entry_point)
    except (ImportError, AttributeError) as err:
        raise EnvError(f"env {env_id!r} cannot be loaded from {_target(entry_point)!r}: {err}") from err
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        takes = [name for name, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [key for key in kwargs if key not in takes]
        if unknown:
            raise EnvConfigError(
                f"env {env_id!r}: bad env_config key {unknown[0]!r}; it takes: {', '.join([*takes, STEP_LATENCY_KEY])}"
            )
    check = getattr(factory, "check_config", None)
    if callable(check):
        check(**kwargs)


def factory_of(env_id: str, **env_config: Any) -> tuple[EnvFactory, dict[str, Any], float]:
    """What `make` calls for `env_id`: the class (or callable), its keyword arguments, and the
    step latency to add (ms)."""
    target, kwargs, latency = spec_of(env_id, **env_config)
    return _resolve(target), kwargs, latency


def spec_of(env_id: str, **env_config: Any) -> tuple[str | EnvFactory, dict[str, Any], float]:
    """What `build` needs to make `env_id` in another process: its "module:Class" (or the
    callable itself, which pickles by reference), keyword arguments and step latency. Imports
    nothing for an id registered by name."""
    latency = _pop_latency(env_id, env_config)
    entry_point, kwargs = _lookup(env_id, env_config)
    target = entry_point if callable(entry_point) else _target(entry_point)
    return target, kwargs, latency


def make(env_id: str, **env_config: Any) -> gym.Env:
    """Make the environment `env_id` with `env_config` as keyword arguments; `step_latency_ms`
    (any environment) wraps it in `StepLatency`. An environment class that is not thread-safe
    (`TextEnv.thread_safe`) is made under its class's lock and wrapped in `Serialized`, so that
    no two of its instances are ever called at once in this process."""
    try:
        return build(*factory_of(env_id, **env_config))
    except TypeError as err:
        # An unknown keyword in env_config surfaces here; name it instead of a bare TypeError.
        if "unexpected keyword argument" in str(err):
            raise EnvConfigError(f"env {env_id!r}: bad env_config key: {err}") from err
        raise


def build(factory: EnvFactory | str, kwargs: dict[str, Any], latency_ms: float = 0.0) -> gym.Env:
    """`make`'s second half: the environment of `factory` (or of the "module:Class" it names),
    serialised where it is not thread-safe, with `latency_ms` added to each step."""
    if isinstance(factory, str):
        factory = _resolve(factory)
    with env_lock(factory):
        env = factory(**kwargs)
    if not is_thread_safe(factory):
        # The lock of the class made (the same as the factory's when the factory is the class),
        # which `expert_action` takes too.
        env = Serialized(env, env_lock(type(env.unwrapped)))
    return StepLatency(env, latency_ms) if latency_ms else env


def expert_action(env: gym.Env) -> str:
    """The expert's next action for `env` (any wrapper depth), under its class's lock when it
    is not thread-safe (an expert may plan with the engine)."""
    with env_lock(type(env.unwrapped)):
        return env.unwrapped.expert_action()
