"""Agent ids -> agents: the user's own agent loop, trained through the chat endpoint.

An agent is an `async def run(task, client, **config) -> float` (the episode's reward), or a
class whose instances, made with `**config` (one per episode), have `async def run(self, task,
client) -> float`.
`task` is an `AgentTask` (the environment reset to one task), `client` an `openai.AsyncOpenAI`
pointed at the episode's own base URL. Installed packages declare agents in the entry-point group
`empg_rllib.agents` (name = agent id, value = "module:attribute"), read in whatever process looks
an id up, so remote env runners find them as the driver does; an experiment file names an id,
never an import path, as it does for environments.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable
from typing import Any

from empg_envs.registry import unknown_id

#: The entry-point group through which installed packages register agent ids.
ENTRY_POINT_GROUP = "empg_rllib.agents"

Registration = str | Callable[..., Any] | importlib.metadata.EntryPoint

_REGISTRY: dict[str, Registration] = {}


class AgentError(ValueError):
    """An agent id that is not known, or an agent (or its config) that cannot be run."""


def register(agent_id: str, target: str | Callable[..., Any]) -> None:
    """Register `target` ("module:attribute" or the agent itself) under `agent_id`, in this
    process only (an installed package's entry point reaches every process)."""
    if isinstance(target, str) and ":" not in target:
        raise ValueError(f"an agent entry point must be 'module:attribute', got {target!r}")
    _REGISTRY[agent_id] = target


def _known() -> dict[str, Registration]:
    """This process's registrations and the installed packages' (read afresh: no import)."""
    known: dict[str, Registration] = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    known.update(_REGISTRY)
    return known


def list_agents() -> list[str]:
    return sorted(_known())


def load(agent_id: str) -> Callable[..., Any]:
    """The agent registered as `agent_id`, checked to have the shape the rollout calls."""
    known = _known()
    if agent_id not in known:
        raise AgentError(unknown_id("agent id", agent_id, known, ENTRY_POINT_GROUP))
    target = known[agent_id]
    try:
        if isinstance(target, importlib.metadata.EntryPoint):
            agent = target.load()
        elif isinstance(target, str):
            module, _, attribute = target.partition(":")
            agent = getattr(importlib.import_module(module), attribute)
        else:
            agent = target
    except (ImportError, AttributeError) as err:
        raise AgentError(f"agent {agent_id!r} cannot be imported: {err}") from err
    run = agent.run if inspect.isclass(agent) else agent
    if not inspect.iscoroutinefunction(run):
        raise AgentError(f"agent {agent_id!r} must be an async function (or a class with an async `run`), "
                         f"got {agent!r}")
    return agent


def check_config(agent_id: str, config: dict[str, Any]) -> None:
    """Every key of `config` is a keyword the agent takes: a misspelt key fails here, before
    any episode, not as a crash of every episode."""
    agent = load(agent_id)
    params = list(inspect.signature(agent).parameters.values())
    if not inspect.isclass(agent):
        if len(params) < 2:
            raise AgentError(f"agent {agent_id!r} must take (task, client, **config), got {inspect.signature(agent)}")
        params = params[2:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    own = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    for key in config:
        if key not in own:
            raise AgentError(f"agent_config key {key!r}: agent {agent_id!r} takes {sorted(own) or 'no keys'}")


def instantiate(agent: Callable[..., Any], config: dict[str, Any]) -> Callable[..., Any]:
    """An async callable `(task, client) -> reward` for one episode; a class agent gets a new
    instance per episode, so that what it keeps on `self` never mixes episodes."""

    async def run(task: Any, client: Any) -> Any:
        if inspect.isclass(agent):
            return await agent(**config).run(task, client)
        return await agent(task, client, **config)

    return run
