"""Whole-group fault handling through RLlib: a crashed environment is retried on a fresh one, a
group is trained whole or dropped whole, and an environment's own error ends the run at once
with a message naming the environment, with a local and with a remote env runner."""

from __future__ import annotations

import pytest
import torch

import empg_envs
from empg_rllib.config.loading import validate
from empg_rllib.core.records import EnvFailure
from empg_rllib.sampling.runner_calls import RunnerError
from empg_rllib.workflows.training import build_algorithm
from tests.env_doubles import FaultyEnv
from tests.helpers import SMALL, lm_weights, train_one_iteration

FAULTY = "test-faulty"
FAULTY_SMALL = {**SMALL, "env": FAULTY, "max_turns": 2, "max_new_tokens": 8}


@pytest.fixture(autouse=True)
def faulty_env():
    """The test double registered in this process, its count of environments made reset."""
    from empg_envs.registry import _REGISTRY

    empg_envs.register(FAULTY, "tests.env_doubles:FaultyEnv")
    FaultyEnv.made = 0
    yield
    _REGISTRY.pop(FAULTY, None)


def experiment(tmp_path, **overrides):
    return validate({**FAULTY_SMALL, "run_dir": str(tmp_path), **overrides})


@pytest.mark.timeout(300)
def test_crashed_env_is_retried_and_its_group_trains_whole(ray_cluster, model_path, tmp_path):
    algo = build_algorithm(experiment(tmp_path, env_config={"crash_first": 1}), model_path)
    try:
        result = algo.train()
    finally:
        algo.stop()
    runners = result["env_runners"]
    assert (runners["num_env_crashes"], runners["num_env_crash_retries"], runners["num_crashed_episodes"]) == (1, 1, 0)
    assert runners["num_episodes"] == 4 and runners["num_crashed_groups_dropped"] == 0
    assert result["train_turns"] == 4  # one turn per episode, every member of both groups


@pytest.mark.timeout(300)
def test_group_is_dropped_whole_and_counted_when_retries_run_out(ray_cluster, model_path, tmp_path):
    # One conversation at a time: the first request crashes on all three environments it gets
    # (one try, two retries); every later one plays on the fourth, healthy environment.
    exp = experiment(tmp_path, env_config={"crash_first": 3}, env_crash_retries=2, max_concurrent_episodes=1)
    result = train_one_iteration(exp, model_path)
    runners = result["env_runners"]
    assert (runners["num_env_crashes"], runners["num_env_crash_retries"], runners["num_crashed_episodes"]) == (3, 2, 1)
    assert runners["num_episodes"] == 3
    assert runners["num_crashed_groups_dropped"] == 1 and runners["num_crashed_groups_dropped_lifetime"] == 1
    assert result["train_turns"] == 2  # the whole group that is left, never its crashed neighbour's survivor


@pytest.mark.timeout(300)
def test_update_is_skipped_when_every_group_is_dropped(ray_cluster, model_path, tmp_path):
    # One conversation at a time, no retries: three of the four episodes crash, so each of the
    # two groups loses a member while one episode ends.
    exp = experiment(tmp_path, env_config={"crash_first": 3}, env_crash_retries=0, max_concurrent_episodes=1)
    algo = build_algorithm(exp, model_path)
    try:
        before = lm_weights(algo)
        result = algo.train()
        after = lm_weights(algo)
    finally:
        algo.stop()
    runners = result["env_runners"]
    assert runners["num_crashed_groups_dropped"] == 2 and runners["num_crashed_episodes"] == 3
    assert result["skipped_iterations"] == 1 and "train_turns" not in result
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.timeout(300)
def test_an_iteration_where_no_episode_ends_stops_the_run(ray_cluster, model_path, tmp_path):
    """An environment that crashes every time (a server nobody runs) stops the run at its first
    iteration instead of skipping every update to the end."""
    algo = build_algorithm(experiment(tmp_path, env_config={"crash_first": 1000}, env_crash_retries=1), model_path)
    try:
        with pytest.raises(EnvFailure, match=rf"iteration 1: every one of the 4 episodes of env '{FAULTY}' crashed on all 2 attempts"):
            algo.train()
    finally:
        algo.stop()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("num_env_runners", [0, 1], ids=["local-runner", "remote-runner"])
def test_env_error_ends_the_run_with_a_message_naming_the_env(ray_cluster, model_path, tmp_path, num_env_runners):
    exp = experiment(tmp_path, env_config={"error_at": "step"}, num_env_runners=num_env_runners)
    algo = build_algorithm(exp, model_path)
    try:
        # A remote runner is another process: register the test double there too, by its
        # entry point (importable there, see tests/env_doubles.py).
        algo.env_runner_group.foreach_env_runner(
            lambda runner: empg_envs.register(FAULTY, "tests.env_doubles:FaultyEnv"), local_env_runner=False
        )
        where = "env runner 1: " if num_env_runners else ""
        message = rf"^{where}env '{FAULTY}' raised ValueError at step 1 of task faulty/\d+ .*the environment's own bug"
        with pytest.raises(EnvFailure, match=message):
            algo.train()
        # Stopped, not replayed: the remote runner is still the one it was, alive and healthy.
        assert algo.env_runner_group.num_remote_worker_restarts() == 0
        assert algo.env_runner_group.num_healthy_remote_workers() == num_env_runners
    finally:
        algo.stop()


def _break_engine(runner) -> None:
    def generate(*args, **kwargs):
        raise ValueError("engine made to fail")

    runner.engine.generate = generate


@pytest.mark.timeout(300)
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_engine_error_on_a_remote_runner_ends_the_run_naming_it(ray_cluster, model_path, tmp_path, asynchronous):
    """Not an actor exit that RLlib restarts and replays: the same error would come back."""
    exp = experiment(tmp_path, env="deepsearch", num_env_runners=1, **{"async": {"enabled": asynchronous}})
    algo = build_algorithm(exp, model_path)
    try:
        algo.env_runner_group.foreach_env_runner(_break_engine, local_env_runner=False)
        with pytest.raises(RunnerError, match=r"^env runner 1: ValueError: engine made to fail\n.*Traceback"):
            algo.train()
        assert algo.env_runner_group.num_remote_worker_restarts() == 0
    finally:
        algo.stop()
