"""Resources per actor from the experiment file: the schema, what reaches RLlib's config, the
plan and whether it fits a cluster, and `empg train --dry-run`. Nothing here starts Ray."""

from __future__ import annotations

import pytest
import yaml

from empg_rllib.cli import main
from empg_rllib.config.loading import validate
from empg_rllib.config.resources import fit_plan, nodes_of_cluster_config, plan_of
from empg_rllib.config.schema import ConfigError

GPU_PLAN = {
    "env": "deepsearch",
    "model": "/models/qwen",
    "num_env_runners": 4,
    "num_learners": 2,
    "learner_backend": "deepspeed",
    "deepspeed": {"zero_optimization": {"stage": 3}},
    "resources": {
        "env_runner": {"cpus": 4, "gpus": 1, "custom": {"vllm_runner": 1}},
        "learner": {"cpus": 8, "gpus": 1, "custom": {"ds_learner": 1}},
    },
}
CLUSTER = {
    "max_workers": 12,
    "head_node_type": "head",
    "available_node_types": {
        "head": {"resources": {"CPU": 8}},
        "gpu_runner": {"max_workers": 8, "resources": {"CPU": 8, "GPU": 1, "vllm_runner": 1}},
        "gpu_learner": {"max_workers": 1, "resources": {"CPU": 96, "GPU": 8, "ds_learner": 8}},
    },
}


def test_resources_default_to_one_cpu_each_and_reject_bad_keys():
    exp = validate({"env": "deepsearch"})
    assert exp.resources.env_runner.ray_resources() == {"CPU": 1}
    assert exp.resources.learner.model_dump() == {"cpus": 1, "gpus": 0, "custom": {}}
    with pytest.raises(ConfigError, match=r"unknown key 'resources.learner.gpu'; did you mean 'resources.learner.gpus'"):
        validate({"resources": {"learner": {"gpu": 1}}})
    with pytest.raises(ConfigError, match=r"'resources.env_runner.custom'.*Ray's own GPU.*cpus / gpus"):
        validate({"resources": {"env_runner": {"custom": {"GPU": 1}}}})
    with pytest.raises(ConfigError, match=r"'resources.env_runner.custom.vllm_runner': 0; expected greater than 0"):
        validate({"resources": {"env_runner": {"custom": {"vllm_runner": 0}}}})
    with pytest.raises(ConfigError, match=r"'resources.learner.cpus': -1"):
        validate({"resources": {"learner": {"cpus": -1}}})


def test_resources_reach_rllibs_config():
    from empg_rllib.algorithm.empg import EMPGConfig

    config = EMPGConfig().experiment_from(validate(GPU_PLAN), "/models/qwen")
    assert (config.num_env_runners, config.num_cpus_per_env_runner, config.num_gpus_per_env_runner) == (4, 4, 1)
    assert config.custom_resources_per_env_runner == {"vllm_runner": 1}
    assert (config.num_learners, config.num_cpus_per_learner, config.num_gpus_per_learner) == (2, 8, 1)
    assert config.custom_resources_per_learner == {"ds_learner": 1}


def test_plan_lists_actors_totals_and_what_runs_in_the_driver():
    plan = plan_of(validate(GPU_PLAN))
    assert plan.totals() == {"CPU": 32, "GPU": 6, "vllm_runner": 4, "ds_learner": 2}
    text = "\n".join(plan.lines())
    assert "env runners      4 x {CPU: 4, GPU: 1, vllm_runner: 1}" in text
    assert "learners         2 x {CPU: 8, GPU: 1, ds_learner: 1}" in text
    assert "deepspeed (ZeRO stage 3)" in text and "/models/qwen" in text and "deepsearch" in text
    local = plan_of(validate({"env": "deepsearch"}))
    assert local.actors == () and local.in_driver == ("env runner", "learner")
    assert fit_plan(local, []) == []


def test_cluster_yaml_node_types_expand_to_their_max_workers():
    nodes, names = nodes_of_cluster_config(CLUSTER)
    assert len(nodes) == 1 + 8 + 1
    assert names[:2] == ["head", "gpu_runner #1"] and names[-1] == "gpu_learner #1"
    assert nodes[-1] == {"CPU": 96.0, "GPU": 8.0, "ds_learner": 8.0}
    assert fit_plan(plan_of(validate(GPU_PLAN)), nodes, names) == []
    with pytest.raises(ValueError, match="available_node_types"):
        nodes_of_cluster_config({"head_node_type": "head"})


def test_a_plan_that_cannot_fit_names_the_actor_and_the_resource():
    nodes, names = nodes_of_cluster_config(CLUSTER)
    # No node type offers the custom resource at all.
    plan = plan_of(validate({**GPU_PLAN, "resources": {**GPU_PLAN["resources"], "learner": {"custom": {"tpu": 1}}}}))
    assert fit_plan(plan, nodes, names) == [
        "each learner (resources.learner) reserves {CPU: 1, tpu: 1}, but no node has enough tpu "
        "(the most on one node is 0)"
    ]
    # Each node type fits one, but not all of them together.
    plan = plan_of(validate({**GPU_PLAN, "num_env_runners": 9, "num_learners": 7}))
    assert fit_plan(plan, nodes, names) == [  # 16 GPUs is just enough
        "the plan reserves vllm_runner: 9 in all (9 env runners x 1); the nodes have 8",
    ]
    plan = plan_of(validate({**GPU_PLAN, "num_env_runners": 8, "num_learners": 9}))
    assert fit_plan(plan, nodes, names) == [
        "the plan reserves GPU: 17 in all (8 env runners x 1, 9 learners x 1); the nodes have 16",
        "the plan reserves ds_learner: 9 in all (9 learners x 1); the nodes have 8",
    ]
    # Every resource is there, but not on one node; then enough in all, but not where it is needed.
    plan = plan_of(runners_only(1))
    assert fit_plan(plan, [{"CPU": 8, "vllm_runner": 1}, {"CPU": 8, "GPU": 1}]) == [
        "each env runner (resources.env_runner) reserves {CPU: 4, GPU: 1, vllm_runner: 1}, "
        "but no node has all of it at once"
    ]
    nodes = [{"CPU": 4, "GPU": 1, "vllm_runner": 1}, {"CPU": 2, "GPU": 1, "vllm_runner": 1}, {"CPU": 2}]
    assert fit_plan(plan_of(runners_only(2)), nodes) == [
        "only 1 of 2 env runners (resources.env_runner: {CPU: 4, GPU: 1, vllm_runner: 1}) fit beside the "
        "other actors: the nodes run out of CPU"
    ]


def runners_only(count):
    return validate({**GPU_PLAN, "num_env_runners": count, "num_learners": 0, "learner_backend": "torch", "deepspeed": {}})


def test_dry_run_prints_the_plan_and_fails_when_it_cannot_fit(tmp_path, capsys):
    import ray

    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump({**GPU_PLAN, "run_dir": str(tmp_path)}))
    cluster = tmp_path / "aws.yaml"
    cluster.write_text(yaml.safe_dump(CLUSTER))
    assert main(["train", str(experiment), "--dry-run", "--cluster-yaml", str(cluster)]) == 0
    out = capsys.readouterr().out
    assert "env runners      4 x" in out and f"fits the node types of {cluster}" in out
    assert main(["train", str(experiment), "--dry-run", "--cluster-yaml", str(cluster), "--set", "num_learners=17"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert not ray.is_initialized() and not (tmp_path / "empg").exists()
