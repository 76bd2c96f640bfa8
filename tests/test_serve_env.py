"""Training on an environment served over HTTP: `empg serve-env` in its own process and the `http`
environment on a remote env runner, one iteration; a crash the server reports is retried like
any environment crash."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

import empg_envs
from empg_envs.remote import TOKEN_ENV
from empg_envs.remote.server import EnvServer, Episodes
from empg_rllib.config.loading import validate
from tests.helpers import SMALL, train_one_iteration

TOKEN = "serve-env-test-token"


@pytest.fixture(scope="module")
def token():
    """In the environment before Ray starts (the next fixture), so that remote runners inherit it."""
    old = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = TOKEN
    yield TOKEN
    if old is None:
        os.environ.pop(TOKEN_ENV)
    else:
        os.environ[TOKEN_ENV] = old


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(token):
    """`empg serve-env deepsearch` as a user runs it, in its own process."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "empg_rllib.cli", "serve-env", "deepsearch", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, TOKEN_ENV: token},
    )
    try:
        first = process.stdout.readline()
        assert first.startswith(f"serving deepsearch at http://127.0.0.1:{port}/v1/"), first
        assert process.stdout.readline().strip() == f"bearer token: ${TOKEN_ENV}"  # never printed when given
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.timeout(300)
def test_one_iteration_on_a_served_environment(token, ray_cluster, model_path, served, tmp_path):
    exp = validate({**SMALL, "env": "http", "env_config": {"url": served}, "max_turns": 4, "num_env_runners": 1,
                    "run_dir": str(tmp_path)})
    result = train_one_iteration(exp, model_path)
    runners = result["env_runners"]
    assert runners["num_episodes"] == exp.tasks_per_batch * exp.group_size
    assert runners["num_env_crashes"] == 0 and result["training_iteration"] == 1


@pytest.mark.timeout(300)
def test_a_crash_the_server_reports_is_retried(token, ray_cluster, model_path, tmp_path):
    from empg_envs.registry import _REGISTRY
    from tests.env_doubles import FaultyEnv

    empg_envs.register("test-faulty", "tests.env_doubles:FaultyEnv")
    FaultyEnv.made = 0  # other tests made some in this process
    try:
        # The first environment the server makes crashes at its first step, as a killed engine would.
        with EnvServer(Episodes("test-faulty", {"crash_first": 1}, token)).start() as server:
            exp = validate({**SMALL, "env": "http", "env_config": {"url": server.url}, "max_turns": 2,
                            "max_new_tokens": 8, "run_dir": str(tmp_path)})
            result = train_one_iteration(exp, model_path)
            # Every episode is closed by its runner (the close may still be on the wire).
            deadline = time.monotonic() + 10
            while server.episodes.info()["open_episodes"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.episodes.info()["open_episodes"] == 0
    finally:
        _REGISTRY.pop("test-faulty", None)
    runners = result["env_runners"]
    assert (runners["num_env_crashes"], runners["num_env_crash_retries"], runners["num_crashed_episodes"]) == (1, 1, 0)
    assert runners["num_episodes"] == 4
