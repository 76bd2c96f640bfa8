"""The env registry: ids, errors that name the problem, user registration."""

from __future__ import annotations

import importlib.metadata
import sys
import time

import pytest

import empg_envs
from empg_envs.deepsearch.env import DeepSearchEnv
from empg_envs.registry import _REGISTRY
from tests.plugin_env import ENV_ID, MODULE, write_env_plugin


def test_builtin_ids_are_listed():
    known = empg_envs.list()
    for env_id in ("alfworld", "webshop", "webshop-server", "deepsearch", "twx/<game>"):
        assert env_id in known


def test_unknown_id_lists_known_ids_and_suggests():
    with pytest.raises(empg_envs.UnknownEnvError) as err:
        empg_envs.make("alfwrld")
    message = str(err.value)
    assert "'alfwrld'" in message and "webshop" in message and "Did you mean 'alfworld'" in message


def test_bad_env_config_key_is_named():
    with pytest.raises(empg_envs.EnvConfigError, match="max_turn"):
        empg_envs.make("deepsearch", max_turn=3)
    with pytest.raises(empg_envs.EnvConfigError, match="split"):
        empg_envs.make("deepsearch", split="validation")


def test_user_registration_by_entry_point_and_callable():
    empg_envs.register("test-deepsearch-alias", "empg_envs.deepsearch.env:DeepSearchEnv")
    empg_envs.register("test-deepsearch-short", lambda **kw: DeepSearchEnv(max_turns=2, **kw))
    try:
        assert isinstance(empg_envs.make("test-deepsearch-alias"), DeepSearchEnv)
        env = empg_envs.make("test-deepsearch-short")
        env.reset(seed=0)
        _, _, terminated, truncated, _ = env.step("search[x]")
        _, _, terminated, truncated, _ = env.step("search[y]")
        assert truncated and not terminated
    finally:
        from empg_envs.registry import _REGISTRY

        _REGISTRY.pop("test-deepsearch-alias", None)
        _REGISTRY.pop("test-deepsearch-short", None)
    with pytest.raises(ValueError, match="module:Class"):
        empg_envs.register("bad", "not_an_entry_point")


@pytest.fixture
def plugin_on_path(tmp_path, monkeypatch):
    """The user's env package importable in this process, and forgotten afterwards."""
    monkeypatch.syspath_prepend(str(write_env_plugin(tmp_path / "site")))
    yield tmp_path / "site"
    _REGISTRY.pop(ENV_ID, None)
    sys.modules.pop(MODULE, None)


def test_an_installed_package_names_its_env_through_an_entry_point(plugin_on_path):
    assert ENV_ID in empg_envs.list()
    empg_envs.check_config(ENV_ID, split="eval_seen", max_turns=2)
    with pytest.raises(empg_envs.EnvConfigError, match="colour"):
        empg_envs.check_config(ENV_ID, colour="red")
    env = empg_envs.make(ENV_ID, max_turns=2)
    obs, _ = env.reset(seed=1)
    assert obs == "Say green."
    _, reward, terminated, _, info = env.step("green")
    assert terminated and info["won"] and reward == 1.0


def test_entry_points_are_read_only_for_ids_not_known_yet(plugin_on_path, monkeypatch):
    scans = []
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: scans.append(kw) or real(**kw))
    empg_envs.check_config("deepsearch")
    assert scans == []
    empg_envs.check_config(ENV_ID)  # first lookup: one scan registers it
    empg_envs.check_config(ENV_ID)
    assert scans == [{"group": "empg_rllib.envs"}]


def test_an_entry_point_claiming_a_known_id_is_an_error_naming_both(tmp_path, monkeypatch):
    info = tmp_path / "other-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: other\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[empg_rllib.envs]\ndeepsearch = other_envs:Search\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(empg_envs.EnvError, match=r"'deepsearch'.*empg_envs.deepsearch.env:DeepSearchEnv.*other.*other_envs:Search"):
        empg_envs.make("no-such-env")


def test_step_before_reset_and_after_end_are_errors():
    env = empg_envs.make("deepsearch", max_turns=1)
    with pytest.raises(empg_envs.EnvError, match="before reset"):
        env.step("search[x]")
    env.reset(seed=0)
    env.step("search[x]")
    with pytest.raises(empg_envs.EnvError, match="after the episode ended"):
        env.step("search[y]")


def test_check_config_names_the_problem_without_making_the_env():
    empg_envs.check_config("deepsearch", split="eval_id", max_turns=3, top_k=2)  # a paper alias of eval_seen
    empg_envs.check_config("twx/coin", game_params={"numLocations": 3})
    with pytest.raises(empg_envs.UnknownEnvError, match="Did you mean 'alfworld'"):
        empg_envs.check_config("alfwrld")
    with pytest.raises(empg_envs.EnvConfigError, match=r"bad env_config key 'topk'; it takes: split, max_turns, top_k, action_choices, step_latency_ms"):
        empg_envs.check_config("deepsearch", topk=2)
    with pytest.raises(empg_envs.EnvConfigError, match="split must be one of"):
        empg_envs.check_config("alfworld", split="valid")
    with pytest.raises(empg_envs.EnvConfigError, match="unknown TWX game 'cokingworld'"):
        empg_envs.check_config("twx/cokingworld")
    with pytest.raises(empg_envs.EnvConfigError, match="game_params"):
        empg_envs.check_config("twx/coin", game_params="numLocations=many")
    with pytest.raises(empg_envs.EnvConfigError, match="step_latency_ms must be a number >= 0, got -5"):
        empg_envs.check_config("deepsearch", step_latency_ms=-5)


@pytest.mark.parametrize("env_id", ["deepsearch", pytest.param("twx/coin", marks=pytest.mark.jvm)])
def test_every_env_takes_step_latency_and_answers_as_without_it(env_id):
    plain, slow = empg_envs.make(env_id, max_turns=3), empg_envs.make(env_id, max_turns=3, step_latency_ms=40)
    try:
        empg_envs.check_config(env_id, step_latency_ms=40)
        assert isinstance(slow, empg_envs.StepLatency) and not isinstance(plain, empg_envs.StepLatency)
        assert slow.reset(seed=3) == plain.reset(seed=3)
        action = empg_envs.expert_action(plain)
        assert empg_envs.expert_action(slow) == action
        started = time.perf_counter()
        answer = slow.step(action)
        assert time.perf_counter() - started >= 0.04  # sleep waits at least that long
        assert answer == plain.step(action)
    finally:
        plain.close()
        slow.close()
