"""Test-wide hygiene and markers.

Every temp file of Ray, vLLM, the JVM and torch stays in one temp dir, made when pytest starts
(`pytest_configure`, before any test module imports torch or Ray) and removed when it ends.

Markers (registered in pyproject.toml):
- `ray`: starts Ray. Added here to every test that uses a Ray fixture (RAY_FIXTURES), directly
  or through another fixture; set by hand on the few that start Ray otherwise.
- `vllm`, `jvm`, `deepspeed`: starts a vLLM engine, JVMs (TextWorld-Express), a DeepSpeed
  learner; set by hand.
- `heavy`: takes more than a few seconds without Ray. Added here to every test that uses the
  offline tiny model (HEAVY_FIXTURES: built once per session, ~20 s of one core) or is marked
  `vllm` or `jvm`; set by hand on tests that build or train models or play many games.
- `slow`: long-running (minutes); set by hand.

Everything without Ray, in about a minute: pytest -m "not ray and not slow and not heavy".
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

#: Fixtures that start (or join) a Ray cluster: a test that uses one, directly or through
#: another fixture, is marked `ray`.
RAY_FIXTURES = frozenset({"ray_cluster", "ray_with_doubles", "cluster", "ray_start_head"})

#: Fixtures that make a test `heavy`: the offline models, built or converted once per test session.
HEAVY_FIXTURES = frozenset({"tiny_model", "model_path", "smollm2_path"})
#: Markers that imply `heavy`.
HEAVY_MARKERS = ("vllm", "jvm")

_ROOT = pytest.StashKey[str]()


def _environment(root: str) -> dict[str, str]:
    return {
        "EMPG_CACHE_DIR": os.path.join(root, "cache"),
        "RAY_TMPDIR": os.path.join(root, "ray"),
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "VLLM_RPC_BASE_PATH": os.path.join(root, "vllm-rpc"),
        "VLLM_CACHE_ROOT": os.path.join(root, "vllm-cache"),
        "VLLM_NO_USAGE_STATS": "1",
        "EMPG_SHM_DIR": os.path.join(root, "shm"),
        "DO_NOT_TRACK": "1",
        "TORCH_EXTENSIONS_DIR": os.path.join(root, "torch-ext"),
        "TORCHINDUCTOR_CACHE_DIR": os.path.join(root, "inductor"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # Importing alfworld creates ~/.cache/alfworld unless this is set; the env ignores a
        # folder without the official json_2.1.1/ layout, so an empty temp dir is safe.
        "ALFWORLD_DATA": os.path.join(root, "alfworld-data"),
        "JAVA_TOOL_OPTIONS": f"-XX:-UsePerfData -Djava.io.tmpdir={root}",
        "TMPDIR": root,
    }


def pytest_configure(config: pytest.Config) -> None:
    """Point every library's temp and cache directories into one fresh temp root. Runs before
    collection, so before any test module imports torch, Ray or vLLM."""
    root = tempfile.mkdtemp(prefix="empg-tests-")
    config.stash[_ROOT] = root
    os.environ.update(_environment(root))
    for key in ("EMPG_CACHE_DIR", "RAY_TMPDIR", "VLLM_RPC_BASE_PATH", "EMPG_SHM_DIR"):
        os.makedirs(os.environ[key], exist_ok=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:  # noqa: ARG001 - hook signature
    root = session.config.stash.get(_ROOT, None)
    if root:
        shutil.rmtree(root, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:  # noqa: ARG001
    """Mark `ray` every test that starts Ray through a fixture (its own or one it depends on),
    and `heavy` every test that needs the tiny model or is marked `vllm` or `jvm`."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & RAY_FIXTURES:
            item.add_marker(pytest.mark.ray)
        if fixtures & HEAVY_FIXTURES or any(item.get_closest_marker(name) for name in HEAVY_MARKERS):
            item.add_marker(pytest.mark.heavy)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray for the tests of one module."""
    from empg_rllib.workflows.session import ray_session

    with ray_session(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def model_path(tiny_model):
    """The offline tiny model's directory."""
    from empg_rllib.workflows import models

    return str(models.resolve_model("tiny:"))


@pytest.fixture(scope="session")
def smollm2_path():
    """SmolLM2-135M-Instruct's model directory, converted once per test session (~30 s)."""
    from empg_rllib.workflows import models

    return models.resolve_model("smollm2:")


@pytest.fixture(scope="session")
def tiny_model():
    """(tokenizer, model) of the offline tiny model, built once per test session."""
    from empg_rllib.workflows import models

    return models.load("tiny:")
