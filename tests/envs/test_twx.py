"""twx/<game>: TextWorld-Express through the protocol (one JVM per env)."""

from __future__ import annotations

import os
import signal

import pytest

import empg_envs
from empg_envs.core import EnvConfigError, EnvCrashed, EnvError

GAMES = ("cookingworld", "twc", "coin", "mapreader")
SPLITS = ("train", "eval_seen", "eval_unseen")


@pytest.fixture(scope="module")
def game_envs():
    """One env (one JVM) per game and split, shared by the module's tests."""
    made = {(g, s): empg_envs.make(f"twx/{g}", split=s) for g in GAMES for s in SPLITS}
    yield made
    for env in made.values():
        env.close()


def _jvm(env):
    return env.unwrapped._engine._gateway.java_process


def _play_expert(env, task) -> tuple[list[float], dict]:
    env.reset(options={"task": task})
    rewards, done = [], False
    while not done:
        _, reward, terminated, truncated, info = env.step(empg_envs.expert_action(env))
        assert not info["invalid_action"]
        rewards.append(reward)
        done = terminated or truncated
    return rewards, info


@pytest.mark.jvm
@pytest.mark.parametrize("game", GAMES)
def test_same_seed_same_episode(game, game_envs):
    env, other = game_envs[(game, "train")], game_envs[(game, "eval_seen")]
    obs_a, info_a = env.reset(seed=5)
    assert env.reset(seed=5) == (obs_a, info_a)
    assert info_a["admissible_actions"] == sorted(info_a["admissible_actions"])
    assert info_a["instruction"] in obs_a and info_a["task_type"] == game
    # Another env (another JVM) plays the same task identically, step by step.
    assert other.reset(options={"task": info_a["task_id"]}) == (obs_a, info_a)
    for _ in range(4):
        action = empg_envs.expert_action(env)
        assert env.step(action) == other.step(action)
    ids = {env.reset(seed=s)[1]["task_id"] for s in range(10)}
    assert len(ids) > 1  # the seed picks the game


@pytest.mark.jvm
@pytest.mark.parametrize("game", GAMES)
def test_splits_are_disjoint_and_task_ids_round_trip(game, game_envs):
    by_split = {}
    for split in SPLITS:
        env = game_envs[(game, split)]
        n = env.unwrapped.tasks()
        by_split[split] = {env.reset(options={"task": i})[1]["task_id"] for i in (0, n // 2, n - 1)}
    assert not by_split["train"] & by_split["eval_seen"]
    assert not (by_split["train"] | by_split["eval_seen"]) & by_split["eval_unseen"]
    # The train env plays an eval task by id, as the eval env does.
    train_env, eval_env = game_envs[(game, "train")], game_envs[(game, "eval_unseen")]
    task_id = sorted(by_split["eval_unseen"])[0]
    obs, info = train_env.reset(options={"task": task_id})
    assert info["task_id"] == task_id
    assert eval_env.reset(options={"task": task_id})[0] == obs


@pytest.mark.jvm
@pytest.mark.parametrize(
    "task", [-1, 10**6, "twx/coin/train/99999", "twx/coin/nosplit/00001", "alfworld/x", 2.0]
)
def test_bad_task_raises(task, game_envs):
    env = game_envs[("twc", "train")]  # a coin id is a bad task for a twc env too
    with pytest.raises(EnvConfigError, match="bad task"):
        env.reset(options={"task": task})


@pytest.mark.jvm
@pytest.mark.parametrize("game", GAMES)
@pytest.mark.parametrize("split", SPLITS)
def test_expert_wins(game, split, game_envs):
    env = game_envs[(game, split)]
    n = env.unwrapped.tasks()
    for task in range(0, n, n // 12):
        rewards, info = _play_expert(env, task)
        assert info["won"] and info["score"] == 1.0, (game, split, task)
        assert sum(rewards) == pytest.approx(1.0)  # rewards are score deltas


@pytest.mark.jvm
@pytest.mark.parametrize("game", GAMES)
def test_invalid_action_keeps_state(game, game_envs):
    env = game_envs[(game, "train")]
    _, info = env.reset(seed=1)
    before = info["admissible_actions"]
    obs, reward, terminated, truncated, info = env.step("fly to the moon")
    assert info["invalid_action"] is True and obs
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert info["admissible_actions"] == before
    # The expert still wins from here: the invalid action changed nothing.
    done = False
    while not done:
        _, _, terminated, truncated, info = env.step(empg_envs.expert_action(env))
        assert info["invalid_action"] is False
        done = terminated or truncated
    assert info["won"]


@pytest.mark.jvm
@pytest.mark.parametrize("game", GAMES)
def test_truncation_at_max_turns(game, game_envs):
    env = game_envs[(game, "eval_unseen")]
    env.reset(seed=0)
    flags = [env.step("inventory")[2:4] for _ in range(env.unwrapped.max_turns)]
    assert flags == [(False, False)] * (len(flags) - 1) + [(False, True)]
    with pytest.raises(EnvError):
        env.step("inventory")


@pytest.mark.jvm
def test_game_params_accept_dict_and_reject_bad_values(game_envs):
    as_dict = empg_envs.make(
        "twx/coin", game_params={"numLocations": 2, "includeDoors": False, "numDistractorItems": 0}
    )
    as_str = empg_envs.make(
        "twx/coin", game_params="numLocations=2, includeDoors=0,numDistractorItems=0"
    )
    try:
        obs = as_dict.reset(seed=3)[0]
        assert as_str.reset(seed=3)[0] == obs
        assert "door" not in obs and "door" in game_envs[("coin", "train")].reset(seed=3)[0]
    finally:
        as_dict.close()
        as_str.close()
    for bad in ("numLocations=many", "numLocations", "numLocations=100", "colour=2", 7):
        with pytest.raises(EnvConfigError, match="game_params"):
            empg_envs.make("twx/coin", game_params=bad)


def test_unknown_game_raises():
    with pytest.raises(EnvConfigError, match="unknown TWX game"):
        empg_envs.make("twx/chess")


@pytest.mark.jvm
def test_jvm_crash_raises_env_crashed_and_a_new_env_works():
    env = empg_envs.make("twx/coin")
    _, info = env.reset(seed=0)
    jvm = _jvm(env)
    os.kill(jvm.pid, signal.SIGKILL)
    jvm.wait(timeout=10)
    with pytest.raises(EnvCrashed):
        env.step(info["admissible_actions"][0])
    with pytest.raises(EnvCrashed):
        env.reset(seed=0)
    env.close()
    fresh = empg_envs.make("twx/coin")
    try:
        assert fresh.reset(seed=0)[1]["task_id"] == info["task_id"]
    finally:
        fresh.close()


@pytest.mark.jvm
def test_close_shuts_the_jvm_down():
    env = empg_envs.make("twx/mapreader")
    env.reset(seed=0)
    jvm = _jvm(env)
    assert jvm.poll() is None
    env.close()
    assert jvm.poll() is not None
    env.close()  # idempotent
    with pytest.raises(EnvCrashed):
        env.reset(seed=0)
