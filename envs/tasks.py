"""`tasks/<dataset>`: the tasks of a dataset that an installed package provides, for an agent
that brings its own world (a question to answer, a repository to fix, an API to call) and returns
its reward itself.

A package declares a dataset in the entry-point group `empg_rllib.tasks` (name = dataset id,
value = "module:attribute"): a callable `(split) -> list of dicts`, one per task, each with a
`task_id` (unique in the split) and an `instruction`, optionally a `task_type`, and any other
keys its agent needs (an answer, a file, a URL). The agent reads the whole record as
`task.data`; the environment has nothing to step.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
from collections.abc import Callable, Mapping
from typing import Any

from empg_envs.core import EnvConfigError, EnvError, TextEnv
from empg_envs.registry import unknown_id

#: The entry-point group through which installed packages provide task datasets.
ENTRY_POINT_GROUP = "empg_rllib.tasks"


def list_datasets() -> list[str]:
    """The dataset ids of the installed packages (a scan, no import)."""
    return sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _entry_point(dataset: str) -> importlib.metadata.EntryPoint:
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if dataset not in found:
        raise EnvConfigError(unknown_id("task dataset", dataset, found, ENTRY_POINT_GROUP, lambda d: f"'tasks/{d}'"))
    return found[dataset]


@functools.lru_cache(maxsize=16)
def load_tasks(dataset: str, split: str) -> tuple[dict[str, Any], ...]:
    """The tasks of `dataset`'s `split`, checked: every record a dict with a unique string
    `task_id` and a string `instruction`. Loaded once per process."""
    source: Callable[[str], Any] = _entry_point(dataset).load()
    records = tuple(source(split) or ())
    if not records:
        raise EnvConfigError(f"task dataset {dataset!r} has no tasks for split {split!r}")
    seen: set[str] = set()
    for i, record in enumerate(records):
        where = f"task dataset {dataset!r}, split {split!r}, task {i}"
        if not isinstance(record, Mapping):
            raise EnvConfigError(f"{where}: expected a dict, got {type(record).__name__}")
        for key in ("task_id", "instruction"):
            if not isinstance(record.get(key), str) or not record[key]:
                raise EnvConfigError(f"{where}: {key!r} must be a non-empty string, got {record.get(key)!r}")
        if record["task_id"] in seen:
            raise EnvConfigError(f"{where}: task_id {record['task_id']!r} appears twice")
        seen.add(record["task_id"])
    return tuple(dict(record) for record in records)


class TaskDatasetEnv(TextEnv):
    """One task of a dataset at a time: reset picks it (a random one, an index, or a task_id),
    the observation is its instruction and `info["data"]` its whole record."""

    thread_safe = True

    def __init__(self, variant: str, max_turns: int = 50, split: str = "train") -> None:
        self.check_config(variant=variant, max_turns=max_turns, split=split)
        super().__init__(max_turns=max_turns, split=split)
        self.dataset = variant
        self.tasks = load_tasks(variant, split)
        self._by_id = {task["task_id"]: task for task in self.tasks}

    @classmethod
    def check_config(cls, **env_config: Any) -> None:
        super().check_config(**env_config)
        if "variant" in env_config:
            _entry_point(env_config["variant"])

    def _reset_task(self, seed: int | None, task: Any) -> tuple[str, dict[str, Any]]:
        if task is None:
            record = self.tasks[int(self.np_random.integers(len(self.tasks)))]
        elif isinstance(task, int) and not isinstance(task, bool) and 0 <= task < len(self.tasks):
            record = self.tasks[task]
        elif isinstance(task, str) and task in self._by_id:
            record = self._by_id[task]
        else:
            raise EnvConfigError(f"bad task {task!r}: expected an index in [0, {len(self.tasks)}) or a task_id "
                                 f"of tasks/{self.dataset} ({self.split})")
        info = {
            "task_id": record["task_id"],
            "task_type": str(record.get("task_type", self.dataset)),
            "instruction": record["instruction"],
            "admissible_actions": None,
            "data": copy.deepcopy(record),  # the agent's own: what it changes stays in its episode
        }
        return record["instruction"], info

    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        raise EnvError(f"tasks/{self.dataset} has no environment to step: its agent plays the task and returns "
                       "the reward itself")
