"""The `ray up` configs in cluster/ and the paper-protocol experiment files: each cluster YAML
passes the autoscaler's own schema (shipped in the ray package) and a broken copy does not; every
paper file validates and its plan fits the node types of both clouds."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from empg_rllib.config.loading import load
from empg_rllib.config.resources import fit_plan, nodes_of_cluster_config, plan_of

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = sorted((ROOT / "cluster").glob("*.yaml"))
PAPER = sorted((ROOT / "tuned_examples" / "paper").glob("*.yaml"))


def cluster(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_there_is_a_config_per_cloud_and_every_paper_run():
    assert [p.name for p in CLUSTERS] == ["aws.yaml", "gcp.yaml"]
    names = {p.stem for p in PAPER}
    for env in ("alfworld", "webshop"):
        for size in ("1.5b", "7b"):
            for algo in ("grpo", "grpo-empg", "dapo", "dapo-empg"):
                assert f"{env}-qwen2.5-{size}-{algo}" in names
    assert {"deepsearch-qwen2.5-32b-dapo", "deepsearch-qwen2.5-32b-dapo-empg"} <= names


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_cluster_config_passes_the_autoscaler_schema(path):
    config = prepare_config(cluster(path))
    validate_config(config)  # raises jsonschema.ValidationError (see the broken copies below)
    assert config["provider"]["type"] == path.stem and config["head_node_type"] in config["available_node_types"]
    # The custom resources the paper files' actors ask for are offered by some node type.
    offered = {name for node in config["available_node_types"].values() for name in node.get("resources", {})}
    assert {"vllm_runner", "ds_learner"} <= offered


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_every_node_starts_ray_with_token_auth_and_a_private_dashboard(path):
    """Anything that reaches an open dashboard can submit a job, which is arbitrary code: every
    `ray start` turns token auth on, the head's dashboard stays on its loopback (reached through
    `ray dashboard`), and the token comes from the user's machine, not from this repository."""
    config = cluster(path)
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert not any("dashboard-host" in c for c in starts)
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    setup = " ; ".join(config["setup_commands"])
    assert "export RAY_AUTH_MODE=token" in setup and "chmod 600 ~/.ray/auth_token" in setup


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
@pytest.mark.parametrize(
    "breakage",
    ["fractional GPU count", "unknown top-level key", "node type without node_config"],
)
def test_the_same_check_rejects_a_broken_copy(path, breakage):
    broken = copy.deepcopy(cluster(path))
    if breakage == "fractional GPU count":
        broken["available_node_types"]["gpu_runner"]["resources"]["GPU"] = 0.5
    elif breakage == "unknown top-level key":
        broken["max_wokers"] = 4
    else:
        del broken["available_node_types"]["gpu_learner"]["node_config"]
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_file_validates_and_fits_both_clouds(path):
    exp = load(path)
    assert (exp.tasks_per_batch, exp.group_size, exp.lr, exp.iterations, exp.history_turns) == (16, 8, 1e-6, 150, 2)
    assert (exp.empg.k, exp.empg.k_f, exp.empg.zeta) == (1.0, 1.0, 0.1)
    assert exp.kl_coef == (0.01 if exp.loss == "grpo" else 0.0)
    assert exp.engine == "vllm" and exp.learner_backend == "deepspeed"
    plan = plan_of(exp)
    for config in CLUSTERS:
        nodes, names = nodes_of_cluster_config(prepare_config(cluster(config)))
        assert fit_plan(plan, nodes, names) == [], config.name


def test_a_plan_too_big_for_the_node_types_is_named():
    exp = load(PAPER[0], ["num_learners=64"])
    nodes, names = nodes_of_cluster_config(prepare_config(cluster(ROOT / "cluster" / "aws.yaml")))
    problems = fit_plan(plan_of(exp), nodes, names)
    assert problems and any("ds_learner" in p or "GPU" in p for p in problems), problems
