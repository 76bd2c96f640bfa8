"""The env registry: ids, errors that name the problem, user registration."""

from __future__ import annotations

import pytest

import envs
from envs.deepsearch.env import DeepSearchEnv


def test_builtin_ids_are_listed():
    known = envs.list()
    for env_id in ("alfworld", "webshop", "webshop-server", "deepsearch", "twx/<game>"):
        assert env_id in known


def test_unknown_id_lists_known_ids_and_suggests():
    with pytest.raises(envs.UnknownEnvError) as err:
        envs.make("alfwrld")
    message = str(err.value)
    assert "'alfwrld'" in message and "webshop" in message and "Did you mean 'alfworld'" in message


def test_bad_env_config_key_is_named():
    with pytest.raises(envs.EnvConfigError, match="max_turn"):
        envs.make("deepsearch", max_turn=3)
    with pytest.raises(envs.EnvConfigError, match="split"):
        envs.make("deepsearch", split="validation")


def test_user_registration_by_entry_point_and_callable():
    envs.register("test-deepsearch-alias", "envs.deepsearch.env:DeepSearchEnv")
    envs.register("test-deepsearch-short", lambda **kw: DeepSearchEnv(max_turns=2, **kw))
    try:
        assert isinstance(envs.make("test-deepsearch-alias"), DeepSearchEnv)
        env = envs.make("test-deepsearch-short")
        env.reset(seed=0)
        _, _, terminated, truncated, _ = env.step("search[x]")
        _, _, terminated, truncated, _ = env.step("search[y]")
        assert truncated and not terminated
    finally:
        from envs.registry import _REGISTRY

        _REGISTRY.pop("test-deepsearch-alias", None)
        _REGISTRY.pop("test-deepsearch-short", None)
    with pytest.raises(ValueError, match="module:Class"):
        envs.register("bad", "not_an_entry_point")


def test_step_before_reset_and_after_end_are_errors():
    env = envs.make("deepsearch", max_turns=1)
    with pytest.raises(envs.EnvError, match="before reset"):
        env.step("search[x]")
    env.reset(seed=0)
    env.step("search[x]")
    with pytest.raises(envs.EnvError, match="after the episode ended"):
        env.step("search[y]")


def test_check_config_names_the_problem_without_making_the_env():
    envs.check_config("deepsearch", split="eval_id", max_turns=3, top_k=2)  # a paper alias of eval_seen
    envs.check_config("twx/coin", game_params={"numLocations": 3})
    with pytest.raises(envs.UnknownEnvError, match="Did you mean 'alfworld'"):
        envs.check_config("alfwrld")
    with pytest.raises(envs.EnvConfigError, match=r"bad env_config key 'topk'; it takes: split, max_turns, top_k"):
        envs.check_config("deepsearch", topk=2)
    with pytest.raises(envs.EnvConfigError, match="split must be one of"):
        envs.check_config("alfworld", split="valid")
    with pytest.raises(envs.EnvConfigError, match="unknown TWX game 'cokingworld'"):
        envs.check_config("twx/cokingworld")
    with pytest.raises(envs.EnvConfigError, match="game_params"):
        envs.check_config("twx/coin", game_params="numLocations=many")
