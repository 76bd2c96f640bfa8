"""ALFWorld (text) behind the `TextEnv` protocol, on generated or official games.

Tasks of a split: with no data dir, `num_tasks` generated games cycling through `task_types`
(task i is game i // len(types) of type types[i % len(types)]), generated on first use and
cached on disk; with `data_dir` (default: $ALFWORLD_DATA when it holds `json_2.1.1/`), the
official games of the split's folder.

An action is valid iff it is one of `info["admissible_actions"]`: the engine's admissible
commands without "help" (a static command reference that agents given the list do not need).
Anything else gets the engine's "Nothing happens." without touching the game, as in ALFWorld.

`distractors` (generated games only): the least and most object types placed in a room besides
the task's, default (4, 7). Fewer make a curriculum: with none, whatever object is in view is
the one to take, so a policy need not match object names to the task to succeed.

`expert`: "planner" plays Fast Downward's optimal plan from the true game state (it walks straight
to hidden objects); "explorer" searches for objects it has not seen (`explorer.py`), so its
demonstrations can be imitated by a policy that only reads observations.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

from empg_envs.alfworld import games, generator, speedups
from empg_envs.alfworld.engine import Engine
from empg_envs.alfworld.explorer import Explorer
from empg_envs.core import EnvConfigError, EnvCrashed, EnvError, TextEnv, cache_dir

NOTHING_HAPPENS = "Nothing happens."
DEFAULT_NUM_TASKS: dict[str, int] = {"train": 2000, "eval_seen": 120, "eval_unseen": 120}
_GENERATED_ID = re.compile(r"alfworld/(train|eval_seen|eval_unseen)/([a-z_]+)/(\d+)")
_OFFICIAL_ID = re.compile(r"alfworld/official/(train|valid_seen|valid_unseen)/(.+)")
EXPERTS = ("planner", "explorer")
_TASK_TEXT = re.compile(r"Your task is to: (.*?)\.?\s*$", re.DOTALL)


def _default_data_dir() -> str | None:
    # `import alfworld` sets ALFWORLD_DATA to its own ~/.cache/alfworld when unset, so the
    # variable alone does not mean official games are there: require their folder.
    data = os.environ.get("ALFWORLD_DATA")
    return data if data and (pathlib.Path(data) / "json_2.1.1").is_dir() else None


class AlfWorldEnv(TextEnv):
    """The ALFWorld TextWorld engine with a Fast Downward expert."""

    # TextWorld's PDDL parser keeps module-level state (engine.py): calls are serialised.
    thread_safe = False

    task_types = generator.TASK_TYPES
    lexicon = generator.LEXICON

    def __init__(
        self,
        split: str = "train",
        max_turns: int = 50,
        task_types: Sequence[str] | None = None,
        num_tasks: int | None = None,
        data_dir: str | None = None,
        expert: str = "planner",
        distractors: Sequence[int] = generator.DEFAULT_DISTRACTORS,
    ) -> None:
        super().__init__(max_turns=max_turns, split=split)
        self.check_config(expert=expert)
        self._types = self._check_types(task_types)
        self._expert = expert
        self._explorer: Explorer | None = None  # the explorer's memory of the current episode
        if num_tasks is not None and (not isinstance(num_tasks, int) or num_tasks < 1):
            raise EnvConfigError(f"num_tasks must be a positive int, got {num_tasks!r}")
        if data_dir is not None and not (pathlib.Path(data_dir) / "json_2.1.1").is_dir():
            raise EnvConfigError(f"data_dir {data_dir!r} has no json_2.1.1/ folder of games")
        self.data_dir = data_dir if data_dir is not None else _default_data_dir()
        speedups.install()
        self._engine = Engine()
        self._generated = games.GeneratedGames(
            cache_dir("alfworld"), self._engine, self._check_distractors(distractors)
        )
        if self.data_dir:
            found = [
                g for g in games.official_games(self.data_dir, split) if g.task_type in self._types
            ]
            if not found:
                raise EnvConfigError(
                    f"data_dir {self.data_dir!r} has no {split} games of types {self._types}"
                )
            self._official: list[games.GameRef] | None = found[:num_tasks]
            self._num_tasks = len(self._official)
        else:
            self._official = None
            self._num_tasks = num_tasks or DEFAULT_NUM_TASKS[split]
        self._crashed: BaseException | None = None
        self._admissible: list[str] = []
        self._plan: list[str] | None = None
        self._won = False

    @classmethod
    def check_config(cls, **env_config: Any) -> None:
        """TextEnv's checks and this environment's own keys, without starting the engine."""
        super().check_config(**env_config)
        if "task_types" in env_config:
            cls._check_types(env_config["task_types"])
        if "distractors" in env_config:
            cls._check_distractors(env_config["distractors"])
        if "expert" in env_config and env_config["expert"] not in EXPERTS:
            raise EnvConfigError(f"expert must be one of {EXPERTS}, got {env_config['expert']!r}")

    @staticmethod
    def _check_distractors(distractors: Sequence[int]) -> tuple[int, int]:
        pair = tuple(distractors) if isinstance(distractors, (list, tuple)) else ()
        if len(pair) != 2 or not all(type(n) is int for n in pair) or not 0 <= pair[0] <= pair[1]:
            raise EnvConfigError(
                f"distractors must be [fewest, most], two ints with 0 <= fewest <= most, got {distractors!r}"
            )
        return pair

    @staticmethod
    def _check_types(task_types: Sequence[str] | None) -> tuple[str, ...]:
        if task_types is None:
            return generator.TASK_TYPES
        if isinstance(task_types, str):
            task_types = [task_types]
        unknown = sorted(set(task_types) - set(generator.TASK_TYPES))
        if unknown or not task_types:
            raise EnvConfigError(
                f"task_types: unknown {unknown}; choose from {generator.TASK_TYPES}"
            )
        # Canonical order, so the same subset always gives the same task list.
        return tuple(t for t in generator.TASK_TYPES if t in task_types)

    def tasks(self) -> int:
        """Number of tasks in this env's split."""
        return self._num_tasks

    # ---- task selection ---------------------------------------------------------------------
    def _task_ref(self, task: Any) -> games.GameRef:
        if task is None:
            task = int(self.np_random.integers(self._num_tasks))
        if isinstance(task, bool) or not isinstance(task, (int, str)):
            raise EnvConfigError(f"task must be an int index or a task_id string, got {task!r}")
        if isinstance(task, int):
            if not 0 <= task < self._num_tasks:
                raise EnvConfigError(f"task index {task} out of range [0, {self._num_tasks})")
            if self._official is not None:
                return self._official[task]
            n = len(self._types)
            return self._generated.get(self.split, self._types[task % n], task // n)
        if m := _GENERATED_ID.fullmatch(task):
            split, task_type, index = m.group(1), m.group(2), int(m.group(3))
            if task_type not in generator.TASK_TYPES:
                raise EnvConfigError(f"task {task!r}: unknown task type {task_type!r}")
            return self._generated.get(split, task_type, index)
        if (m := _OFFICIAL_ID.fullmatch(task)) and self.data_dir:
            split = {v: k for k, v in games.OFFICIAL_SPLITS.items()}[m.group(1)]
            for ref in games.official_games(self.data_dir, split):
                if ref.task_id == task:
                    return ref
        raise EnvConfigError(f"unknown task {task!r}")

    # ---- engine calls -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Turn any engine failure into EnvCrashed; the env stays unusable afterwards."""
        if self._crashed is not None:
            raise EnvCrashed(f"ALFWorld engine crashed earlier: {self._crashed!r}; make a new env")
        if self._engine.closed:
            raise EnvError("the env is closed")
        try:
            yield
        except EnvError:
            raise
        except Exception as err:
            self._crashed = err
            raise EnvCrashed(f"ALFWorld engine failed: {err!r}") from err

    def _reset_task(self, seed: int | None, task: Any) -> tuple[str, dict[str, Any]]:
        with self._guard():
            ref = self._task_ref(task)
            self._engine.load(str(ref.path))
            state = self._engine.reset()
        obs = state.feedback.strip()
        m = _TASK_TEXT.search(obs)
        self._admissible = self._visible(state["admissible_commands"])
        # Saves planning at reset, which takes up to ~0.5 s on some pick-two games.
        self._plan = (self._engine.walkthrough() or None) if ref.planned else None
        self._won = bool(state["won"])
        if self._expert == "explorer":
            self._explorer = Explorer()
            self._explorer.observe(obs)
        info = {
            "task_id": ref.task_id,
            "task_type": ref.task_type,
            "instruction": m.group(1) if m else "",
            "admissible_actions": list(self._admissible),
            "won": self._won,
            "score": float(self._won),
        }
        return obs, info

    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        command = action.strip()
        invalid = command not in self._admissible
        if invalid:
            obs = NOTHING_HAPPENS
        else:
            with self._guard():
                state = self._engine.step(command)
            obs = state.feedback.strip()
            self._admissible = self._visible(state["admissible_commands"])
            self._won = bool(state["won"])
            # The rest of an optimal plan stays optimal after its first action; else replan,
            # except after an explorer's detour to look somewhere: moving changes no object, and
            # a plan that starts by walking costs the same from anywhere.
            if self._plan and self._plan[0] == command:
                self._plan = self._plan[1:]
            elif not (self._plan and self._plan[0].startswith("go to ") and command.startswith("go to ")):
                self._plan = None
            if self._explorer is not None:
                self._explorer.observe(obs)
        info = {
            "admissible_actions": list(self._admissible),
            "won": self._won,
            "score": float(self._won),
            "invalid_action": invalid,
        }
        return obs, float(self._won), self._won, info

    @staticmethod
    def _visible(commands: list[str]) -> list[str]:
        return [c for c in commands if c != "help"]

    def expert_action(self) -> str:
        """The first action of a Fast Downward optimal plan from the current state, or the
        explorer's action when `expert="explorer"`."""
        if not self._task_info:
            raise EnvError("expert_action() called before reset()")
        if self._won:
            raise EnvError("the task is already solved; nothing left for the expert")
        if self._plan is None:
            with self._guard():
                self._plan = self._engine.plan()
        if not self._plan:
            raise EnvError(f"the planner found no plan for {self._task_info['task_id']}")
        if self._explorer is not None:
            return self._explorer.act(self._plan, self._admissible)
        return self._plan[0]

    def close(self) -> None:
        self._engine.close()
        super().close()
