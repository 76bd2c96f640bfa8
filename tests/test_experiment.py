"""Experiment YAML validation: errors name the key before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from empg_rllib.config.loading import load, validate
from empg_rllib.config.schema import ConfigError, Experiment

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "tuned_examples").glob("*.yaml"))


def test_unknown_key_names_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown key 'group_sise'.*did you mean 'group_size'"):
        validate({"group_sise": 8})


def test_unknown_nested_key_names_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown key 'empg.zetta'.*did you mean 'empg.zeta'"):
        validate({"empg": {"zetta": 0.1}})


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"'tasks_per_batch'.*'many'.*integer"):
        validate({"tasks_per_batch": "many"})
    with pytest.raises(ConfigError, match=r"'empg.k'.*number"):
        validate({"empg": {"k": [1]}})
    with pytest.raises(ConfigError, match=r"'loss'.*'grpo' or 'dapo'"):
        validate({"loss": "ppo"})


def test_constrained_actions_need_think_off_and_shape_the_prompt():
    with pytest.raises(ConfigError, match=r"^constrain_actions: true samples the action alone; set think: false$"):
        validate({"constrain_actions": True, "think": True})
    exp = validate({"constrain_actions": True, "list_admissible_actions": False, "history_turns": 3})
    assert exp.prompt_config.list_admissible_actions is False and exp.prompt_config.history_turns == 3


def test_dapo_defaults_to_clip_higher():
    assert (validate({"loss": "dapo"}).clip_low, validate({"loss": "dapo"}).clip_high) == (0.2, 0.28)
    assert validate({"loss": "grpo"}).clip_high == 0.2
    assert validate({"loss": "dapo", "clip_high": 0.3}).clip_high == 0.3
    assert validate({"loss": "dapo"}).aggregation == "token_mean"


def test_overrides_and_missing_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("env: webshop\nempg: {k: 2.0}\n")
    exp = load(path, ["empg.zeta=0.3", "group_size=2"])
    assert (exp.env, exp.empg.k, exp.empg.zeta, exp.group_size) == ("webshop", 2.0, 0.3, 2)
    with pytest.raises(ConfigError, match="not key=value"):
        load(path, ["group_size"])
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "missing.yaml")
    path.write_text("env: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(path)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_tuned_examples_validate_and_name_known_envs(path):
    import empg_envs

    exp = load(path)
    assert isinstance(exp, Experiment)
    known = empg_envs.list()
    assert exp.env in known or any(exp.env.startswith(k.split("<")[0]) for k in known if k.endswith(">"))


def test_cli_rejects_bad_yaml_before_ray_starts(tmp_path):
    import ray

    from empg_rllib.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("env: alfworld\ngroup_sise: 8\n")
    with pytest.raises(SystemExit, match="did you mean 'group_size'"):
        main(["train", str(path)])
    with pytest.raises(SystemExit, match=r"'lr'.*number"):
        main(["train", str(path), "--set", "group_sise=", "--set", "lr=fast"])
    assert not ray.is_initialized()


def test_step_entropy_defaults_to_choice_tokens_under_constrained_decoding():
    assert validate({}).empg.step_entropy == "all_tokens"
    assert validate({"constrain_actions": True}).empg.step_entropy == "choice_tokens"
    explicit = validate({"constrain_actions": True, "empg": {"step_entropy": "all_tokens"}})
    assert explicit.empg.step_entropy == "all_tokens"
    assert "step_entropy" not in explicit.empg.modulation()
    assert Experiment.model_fields["empg"].default.step_entropy is None  # the shared default is untouched
    with pytest.raises(ConfigError, match=r"'empg.step_entropy'"):
        validate({"empg": {"step_entropy": "some_tokens"}})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"env": "alfwrld"}, r"^bad value for 'env': 'alfwrld'; unknown env id .*Did you mean 'alfworld'"),
        ({"env": "twx/cokingworld"}, r"^bad value for 'env': 'twx/cokingworld'; unknown TWX game"),
        ({"env": "deepsearch", "env_config": {"topk": 2}}, r"^bad value for 'env_config'.*bad env_config key 'topk'"),
        ({"env": "deepsearch", "env_config": {"split": "eval_seen"}}, r"^'env_config.split' is set by the experiment"),
        ({"env": "deepsearch", "evaluation": {"splits": ["eval_seen", "valid"]}}, r"^bad value for 'evaluation.splits': 'valid'"),
        ({"env": "deepsearch", "sft": {"split": "test"}}, r"^bad value for 'sft.split': 'test'"),
    ],
    ids=["unknown-env", "unknown-twx-game", "env-config-key", "env-config-split", "eval-split", "sft-split"],
)
def test_environment_settings_are_checked_before_ray_starts(settings, message):
    import ray

    with pytest.raises(ConfigError, match=message):
        validate(settings)
    assert not ray.is_initialized()


def test_env_crash_retries_default_and_bounds():
    assert validate({"env": "deepsearch"}).env_crash_retries == 2
    assert validate({"env": "deepsearch", "env_crash_retries": 0}).env_crash_retries == 0
    with pytest.raises(ConfigError, match="'env_crash_retries'"):
        validate({"env_crash_retries": -1})
