"""tasks/<dataset>: an installed package's task dataset as an environment that only resets (the
example agent package provides `sums`)."""

from __future__ import annotations

import importlib.metadata

import pytest

import empg_envs
from empg_envs.core import EnvConfigError, EnvError
from empg_envs.tasks import load_tasks


def test_reset_picks_a_task_by_index_id_or_seed_and_hands_over_its_record():
    env = empg_envs.make("tasks/sums", split="train")
    obs, info = env.reset(seed=0, options={"task": "sum-train-2-3"})
    assert obs == info["instruction"] == "What is 2 + 3?" and info["data"]["answer"] == 5
    assert env.reset(options={"task": 1})[1]["task_id"] == "sum-train-2-4"
    drawn = [env.reset(seed=s)[1]["task_id"] for s in (3, 3, *range(10))]
    assert drawn[0] == drawn[1] and len(set(drawn)) > 2  # a seed draws its task; seeds draw apart
    assert "sums" in empg_envs.tasks.list_datasets() and "tasks/<dataset>" in empg_envs.list()
    with pytest.raises(EnvError, match="tasks/sums has no environment to step"):
        env.step("5")
    with pytest.raises(EnvConfigError, match="bad task 'nope': expected an index in \\[0, 200\\)"):
        env.reset(options={"task": "nope"})


def test_bad_datasets_are_named_before_anything_is_played(monkeypatch):
    with pytest.raises(EnvConfigError, match="unknown task dataset 'sumz'; did you mean 'tasks/sums'"):
        empg_envs.check_config("tasks/sumz")
    datasets = {
        "empty": lambda split: [],
        "no-id": lambda split: [{"instruction": "x"}],
        "twice": lambda split: [{"task_id": "a", "instruction": "x"}, {"task_id": "a", "instruction": "y"}],
    }
    tasks_group = empg_envs.tasks.ENTRY_POINT_GROUP
    points = [importlib.metadata.EntryPoint(name, f"{__name__}:{name}", tasks_group) for name in datasets]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: points if group == tasks_group else [])
    monkeypatch.setattr(importlib.metadata.EntryPoint, "load", lambda self: datasets[self.name])
    load_tasks.cache_clear()
    try:
        with pytest.raises(EnvConfigError, match="task dataset 'empty' has no tasks for split 'eval_seen'"):
            load_tasks("empty", "eval_seen")
        with pytest.raises(EnvConfigError, match="task dataset 'no-id', split 'train', task 0: 'task_id' must be"):
            load_tasks("no-id", "train")
        with pytest.raises(EnvConfigError, match="task 1: task_id 'a' appears twice"):
            load_tasks("twice", "train")
    finally:
        load_tasks.cache_clear()
