"""The ALFWorld text engine: TextWorld's PDDL backend with alfworld's name demangler.

One `Engine` holds one `PddlEnv` for its whole life and loads game after game into it: each
`PddlEnv` dlopens its own copy of fast-downward's library and never unloads it (2-4 MiB of
RSS per instance), so one per game would leak memory.

TextWorld's PDDL backend parses with module-level parser state (tatsu), which threads corrupt:
engines stepped on several threads at once (a runner's env workers) failed in its parser. So
`AlfWorldEnv` is not thread-safe (`TextEnv.thread_safe`): `empg_envs.make` serialises every call
into ALFWorld environments in a process, and process env workers run them in parallel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import textworld
from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
from textworld.envs.pddl import PddlEnv


class Engine:
    """Loads, resets and steps ALFWorld games; plans with Fast Downward on demand."""

    def __init__(self) -> None:
        infos = textworld.EnvInfos(admissible_commands=True, won=True)
        self._env = AlfredDemangler()(PddlEnv(infos))
        self._pddl: PddlEnv = self._env.unwrapped
        self._loaded: Any = None
        self._closed = False

    def load(self, game: str | Mapping[str, Any]) -> None:
        """Load a game file path or an in-memory game dict (parses grammar and domain)."""
        if isinstance(game, str) and game == self._loaded:
            return
        self._loaded = None
        self._env.load(game)
        self._loaded = game if isinstance(game, str) else None

    def reset(self) -> textworld.GameState:
        return self._env.reset()

    def step(self, command: str) -> textworld.GameState:
        state, _, _ = self._env.step(command)
        return state

    def plan(self) -> list[str]:
        """An optimal plan from the current state (empty when the goal holds or is unreachable).

        Computed only when asked: requesting `policy_commands` would replan on every step, which
        costs ~24 ms a step on pick-two goals.
        """
        return self._pddl._pddl_state.replan(self._pddl._entity_infos)

    def walkthrough(self) -> list[str]:
        """The loaded game file's stored walkthrough (empty if it has none)."""
        return list(self._pddl.walkthrough or [])

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Mark the engine unusable. The planner library stays loaded: unloading two of its
        copies (`fast_downward.close_lib`) makes the interpreter segfault at exit."""
        self._closed = True
