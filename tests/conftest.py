"""Test-wide hygiene: every temp file of Ray, vLLM, the JVM and torch stays in one temp dir."""

from __future__ import annotations

import os
import shutil
import tempfile

_ROOT = tempfile.mkdtemp(prefix="empg-tests-")
_ENV = {
    "EMPG_CACHE_DIR": os.path.join(_ROOT, "cache"),
    "RAY_TMPDIR": os.path.join(_ROOT, "ray"),
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "VLLM_RPC_BASE_PATH": os.path.join(_ROOT, "vllm-rpc"),
    "VLLM_CACHE_ROOT": os.path.join(_ROOT, "vllm-cache"),
    "VLLM_NO_USAGE_STATS": "1",
    "EMPG_SHM_DIR": os.path.join(_ROOT, "shm"),
    "DO_NOT_TRACK": "1",
    "TORCH_EXTENSIONS_DIR": os.path.join(_ROOT, "torch-ext"),
    "TORCHINDUCTOR_CACHE_DIR": os.path.join(_ROOT, "inductor"),
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Importing alfworld creates ~/.cache/alfworld unless this is set; the env ignores a folder
    # without the official json_2.1.1/ layout, so an empty temp dir is safe.
    "ALFWORLD_DATA": os.path.join(_ROOT, "alfworld-data"),
    "JAVA_TOOL_OPTIONS": f"-XX:-UsePerfData -Djava.io.tmpdir={_ROOT}",
}
for _key, _value in _ENV.items():
    os.environ[_key] = _value
for _key in ("EMPG_CACHE_DIR", "RAY_TMPDIR", "VLLM_RPC_BASE_PATH", "EMPG_SHM_DIR"):
    os.makedirs(os.environ[_key], exist_ok=True)
os.environ["TMPDIR"] = _ROOT


def pytest_sessionfinish(session, exitstatus):  # noqa: ARG001 - pytest hook signature
    shutil.rmtree(_ROOT, ignore_errors=True)


import pytest  # noqa: E402 - the environment above must be set before anything imports torch


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray for the tests of one module."""
    from empg_rllib.training import ray_session

    with ray_session(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def model_path(tiny_model):
    """The offline tiny model's directory."""
    from empg_rllib import models

    return str(models.resolve_model("tiny:"))


@pytest.fixture(scope="session")
def tiny_model():
    """(tokenizer, model) of the offline tiny model, built once per test session."""
    from empg_rllib import models

    return models.load("tiny:")
