"""The env registry: ids, errors that name the problem, user registration."""

from __future__ import annotations

import importlib.metadata
import sys
import time

import pytest

import envs
from envs.deepsearch.env import DeepSearchEnv
from envs.registry import _REGISTRY
from tests.plugin_env import ENV_ID, MODULE, write_env_plugin


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


@pytest.fixture
def plugin_on_path(tmp_path, monkeypatch):
    """The user's env package importable in this process, and forgotten afterwards."""
    monkeypatch.syspath_prepend(str(write_env_plugin(tmp_path / "site")))
    yield tmp_path / "site"
    _REGISTRY.pop(ENV_ID, None)
    sys.modules.pop(MODULE, None)


def test_an_installed_package_names_its_env_through_an_entry_point(plugin_on_path):
    assert ENV_ID in envs.list()
    envs.check_config(ENV_ID, split="eval_seen", max_turns=2)
    with pytest.raises(envs.EnvConfigError, match="colour"):
        envs.check_config(ENV_ID, colour="red")
    env = envs.make(ENV_ID, max_turns=2)
    obs, _ = env.reset(seed=1)
    assert obs == "Say green."
    _, reward, terminated, _, info = env.step("green")
    assert terminated and info["won"] and reward == 1.0


def test_entry_points_are_read_only_for_ids_not_known_yet(plugin_on_path, monkeypatch):
    scans = []
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: scans.append(kw) or real(**kw))
    envs.check_config("deepsearch")
    assert scans == []
    envs.check_config(ENV_ID)  # first lookup: one scan registers it
    envs.check_config(ENV_ID)
    assert scans == [{"group": "empg_rllib.envs"}]


def test_an_entry_point_claiming_a_known_id_is_an_error_naming_both(tmp_path, monkeypatch):
    info = tmp_path / "other-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: other\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[empg_rllib.envs]\ndeepsearch = other_envs:Search\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(envs.EnvError, match=r"'deepsearch'.*envs.deepsearch.env:DeepSearchEnv.*other.*other_envs:Search"):
        envs.make("no-such-env")


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
    with pytest.raises(envs.EnvConfigError, match=r"bad env_config key 'topk'; it takes: split, max_turns, top_k, action_choices, step_latency_ms"):
        envs.check_config("deepsearch", topk=2)
    with pytest.raises(envs.EnvConfigError, match="split must be one of"):
        envs.check_config("alfworld", split="valid")
    with pytest.raises(envs.EnvConfigError, match="unknown TWX game 'cokingworld'"):
        envs.check_config("twx/cokingworld")
    with pytest.raises(envs.EnvConfigError, match="game_params"):
        envs.check_config("twx/coin", game_params="numLocations=many")
    with pytest.raises(envs.EnvConfigError, match="step_latency_ms must be a number >= 0, got -5"):
        envs.check_config("deepsearch", step_latency_ms=-5)


@pytest.mark.parametrize("env_id", ["deepsearch", "twx/coin"])
def test_every_env_takes_step_latency_and_answers_as_without_it(env_id):
    plain, slow = envs.make(env_id, max_turns=3), envs.make(env_id, max_turns=3, step_latency_ms=40)
    try:
        envs.check_config(env_id, step_latency_ms=40)
        assert isinstance(slow, envs.StepLatency) and not isinstance(plain, envs.StepLatency)
        assert slow.reset(seed=3) == plain.reset(seed=3)
        action = envs.expert_action(plain)
        assert envs.expert_action(slow) == action
        started = time.perf_counter()
        answer = slow.step(action)
        assert time.perf_counter() - started >= 0.04  # sleep waits at least that long
        assert answer == plain.step(action)
    finally:
        plain.close()
        slow.close()
