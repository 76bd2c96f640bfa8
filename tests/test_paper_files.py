"""The paper's experiment files (tuned_examples/paper/), each run for one iteration at miniature
scale on a CPU: overrides shrink sizes only (SmolLM2-135M for the Qwen2.5 model, one task of
two episodes, two short turns, CPU resources, no custom node types, WebShop's stand-in server
for the real one), and every code path the file names stays: `engine: vllm` on a remote runner, DeepSpeed ZeRO-3 with 2 learners (and
optimizer offload where the file has it), gradient checkpointing, `think`, history, KL, bf16.

Slow (about 2 minutes a file on 2 cores): `make paper-smoke`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from empg_rllib.config.loading import read_yaml, validate

ROOT = Path(__file__).resolve().parent.parent / "empg_rllib" / "tuned_examples"
PAPER = sorted((ROOT / "paper").glob("*.yaml"))

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.deepspeed, pytest.mark.timeout(900)]


def miniature(config: dict[str, Any], model: str, run_dir: str, webshop_url: str) -> dict[str, Any]:
    """`config` at miniature scale: what changes is sizes and where things live, never which
    code runs."""
    env_config = {k: v for k, v in config.get("env_config", {}).items() if k != "data_dir"}  # generated games
    if "url" in env_config:
        env_config["url"] = webshop_url
    vllm = {**config.get("vllm", {}), "tensor_parallel_size": 1, "kv_cache_gib": 0.5}
    return {
        **config,
        "model": model,
        "run_dir": run_dir,
        "env_config": env_config,
        "tasks_per_batch": 1,
        "group_size": 2,
        "max_turns": 2,
        "max_new_tokens": 24,
        "iterations": 1,
        "checkpoint_every": 0,
        "evaluation": {**config.get("evaluation", {}), "interval": 0},
        "num_env_runners": 1,
        "num_learners": 2,
        "vllm": vllm,
        "resources": {"env_runner": {"cpus": 1}, "learner": {"cpus": 1}},
    }


@pytest.fixture(scope="module")
def four_cpu_ray():
    """A runner and two learners of one CPU each: Ray's CPUs are a count, not the cores."""
    from empg_rllib.workflows.session import ray_session

    with ray_session(num_cpus=4):
        yield


@pytest.fixture(scope="module")
def webshop_url():
    """WebShop's stand-in server (the real one needs its 1.18M-product index), on localhost."""
    from empg_envs.webshop.standin_server import StandinServer

    with StandinServer() as server:
        yield server.url


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_file_runs_one_miniature_iteration(four_cpu_ray, smollm2_path, webshop_url, tmp_path, path):
    from empg_rllib.workflows.training import build_algorithm

    full = validate(read_yaml(path))
    exp = validate(miniature(read_yaml(path), str(smollm2_path), str(tmp_path), webshop_url))
    # The code paths of the full-size file.
    for key in ("engine", "learner_backend", "deepspeed", "gradient_checkpointing", "think", "history_turns",
                "kl_coef", "loss", "advantage", "empg", "dtype", "env"):
        assert getattr(exp, key) == getattr(full, key), key
    algo = build_algorithm(exp, str(smollm2_path))
    try:
        result = algo.train()
    finally:
        algo.stop()
    assert result["env_runners"]["num_episodes"] == exp.tasks_per_batch * exp.group_size
    assert result["training_iteration"] == 1
