"""Real multi-node Ray on this machine, bound to 127.0.0.1: actors land on the node types their
`resources.*.custom` name, a user's env package reaches env runners on other nodes, a node
removed mid-run costs its env runners a restart and not the run, and `ray start` + `ray job
submit -- empg train` trains and checkpoints. Declared GPUs only: nothing here runs CUDA."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from empg_envs.registry import _REGISTRY
from empg_rllib.config.loading import validate
from tests.helpers import SMALL
from tests.plugin_env import ENV_ID, write_env_plugin

TINY = {
    **SMALL,
    "tasks_per_batch": 1,
    "max_turns": 2,
    "max_new_tokens": 8,
    "iterations": 2,
    "evaluation": {"splits": ["eval_seen"], "episodes": 2},
}
RUNNER = {"cpus": 1, "custom": {"vllm_runner": 1}}
LEARNER = {"cpus": 1, "custom": {"ds_learner": 1}}
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_of(_: object = None) -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


@pytest.fixture(scope="module", autouse=True)
def loopback_only():
    """Every node, driver and job of this module on 127.0.0.1. Ray turns a 127.0.0.1 in a
    cluster address into the machine's outward IP (where nothing listens when the nodes were
    bound to 127.0.0.1) unless multi-machine clusters are switched off: in this process by the
    constant Ray read at import, in the processes it starts by the environment variable."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    yield
    ray_constants.ENABLE_RAY_CLUSTER = saved
    os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)


@pytest.mark.ray
def test_a_local_ray_keeps_worker_logs_where_it_was_told(tmp_path):
    """Before the tests that share the module's cluster: a joined Ray is not restarted."""
    import ray

    from empg_rllib.workflows.session import ray_session

    @ray.remote(num_cpus=0)
    def speak() -> None:
        print("hello from a worker")

    with ray_session(num_cpus=1, logs_to=tmp_path / "ray_logs"):
        ray.get(speak.remote())
    (session,) = (tmp_path / "ray_logs").iterdir()
    assert session.name.startswith("session_")
    assert any("hello from a worker" in f.read_text(errors="replace") for f in session.glob("worker-*.out"))


def test_train_refuses_a_dashboard_address_and_says_to_submit_a_job(tmp_path, monkeypatch):
    from empg_rllib.cli import main

    monkeypatch.setenv("RAY_ADDRESS", "")  # main() writes --address into it; undone after the test
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("env: deepsearch\n")
    with pytest.raises(SystemExit, match=r"http://head:8265 is a dashboard.*ray job submit --address http://head:8265"):
        main(["train", str(experiment), "--address", "http://head:8265"])


def test_the_workers_environment_leaves_a_submitted_jobs_own_variables_alone(monkeypatch):
    from empg_rllib.workflows.session import WORKER_ENV, _worker_env_beside_job

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert _worker_env_beside_job() == WORKER_ENV
    job = {"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "0", "PYTHONPATH": "/shared/envs"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert _worker_env_beside_job() == {"TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """The user's env package, importable wherever PYTHONPATH names it."""
    return write_env_plugin(tmp_path_factory.mktemp("plugin"))


def dashboard_is_up(url: str, env: dict[str, str]) -> bool:
    """Whether the dashboard at `url` lists a node, asked by another process: this one's Ray
    client keeps the auth mode it first read."""
    probe = "from empg_rllib.workflows.cluster import live_nodes; import sys; sys.exit(0 if live_nodes(sys.argv[1])[0] else 1)"
    return subprocess.run([sys.executable, "-c", probe, url], env=env, capture_output=True, timeout=60, check=False).returncode == 0


def write_auth_token(directory: str | os.PathLike) -> dict[str, str]:
    """A fresh token in `directory`/auth_token, readable by its owner only (as the cluster
    configs ship one to every node, there: ~/.ray/auth_token), and the variables that turn
    token authentication on with it for the processes that get them."""
    import secrets

    token = Path(directory) / "auth_token"
    token.write_text(secrets.token_hex(16))
    token.chmod(0o600)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def gcs_refuses(address: str, token: str | None) -> bool:
    """Whether the GCS at `address` answers UNAUTHENTICATED to a request carrying `token`
    (None: none at all) as its bearer token; False when it answers."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetAllNodeInfo(
                gcs_service_pb2.GetAllNodeInfoRequest(), metadata=metadata, timeout=30
            )
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                return True
            raise
    return False


@pytest.fixture
def ray_start_head():
    """`ray start --head --block` with token authentication on (as cluster/*.yaml start every
    node), its own ports and a temp dir short enough for Ray's sockets; SIGTERM to that one
    process stops every process it started. Yields the dashboard and GCS addresses and the
    environment a client with the token runs in."""
    temp = tempfile.mkdtemp(prefix="h", dir=os.environ["RAY_TMPDIR"])
    gcs, dashboard = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(write_auth_token(temp))
    head = subprocess.Popen(
        [
            str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
            f"--temp-dir={temp}", "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(Path(temp) / "head.err").open("w"),
        env=env,
    )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        # Up when the dashboard lists the head node (it answers a few seconds before that).
        deadline = time.monotonic() + 120
        while not dashboard_is_up(url, env):
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head did not come up (exit code {head.poll()}): "
                                   f"{(Path(temp) / 'head.err').read_text()[-2000:]}")
            time.sleep(1)
        yield url, f"127.0.0.1:{gcs}", env
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_job_submit_trains_on_a_started_cluster(ray_start_head, plugin_dir, model_path, tmp_path, monkeypatch):
    """About 140 s here, 45 s of it starting the head (and building the tiny model): `empg train
    --dry-run` against the running cluster, `ray job submit -- empg train` of a tiny run whose
    env comes from a package the job ships on PYTHONPATH (its runtime_env), and `empg eval` of
    its checkpoint as a second job."""
    from empg_rllib.workflows.runs import latest_checkpoint, load_checkpoint

    dashboard, gcs, env = ray_start_head
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(
        yaml.safe_dump(
            {**TINY, "name": "job", "env": ENV_ID, "model": model_path, "run_dir": str(tmp_path), "num_env_runners": 1}
        )
    )

    def dry_run(address: str, *overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "empg"), "train", str(experiment), "--dry-run", "--address", address, *overrides],
            capture_output=True, text=True, env={**env, "PYTHONPATH": str(plugin_dir)}, timeout=120, check=False,
        )

    dry = dry_run(dashboard, "--set", "num_env_runners=3")
    assert dry.returncode == 1, dry.stdout + dry.stderr
    assert "does NOT fit the 1 alive node(s)" in dry.stdout and "CPU: 3 in all" in dry.stdout
    dry = dry_run(gcs)
    assert dry.returncode == 0 and f"fits the 1 alive node(s) of the cluster at {gcs}" in dry.stdout, dry.stdout + dry.stderr

    def submit(*command: str, client_env: dict[str, str] = env) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", dashboard,
             "--runtime-env-json", json.dumps({"env_vars": {"PYTHONPATH": str(plugin_dir)}}), "--", *command],
            capture_output=True, text=True, env=client_env, timeout=500, check=False,
        )

    # Token authentication is on: a client without the token, or with another one, submits nothing.
    anonymous = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"} | {"RAY_AUTH_MODE": "disabled"}
    impostor = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"} | {"RAY_AUTH_TOKEN": "0" * 32}
    for client_env in (anonymous, impostor):
        refused = submit("echo", "owned", client_env=client_env)
        assert refused.returncode != 0 and "AuthenticationError" in refused.stdout + refused.stderr

    def succeeded(*command: str) -> str:
        job = submit(*command)
        assert "succeeded" in job.stdout, job.stdout[-4000:] + job.stderr[-2000:]
        return job.stdout

    out = succeeded(str(BIN / "empg"), "train", str(experiment))
    checkpoint = latest_checkpoint(tmp_path / "job")
    assert checkpoint is not None and checkpoint.name == "checkpoint_000002" and "checkpoint:" in out
    monkeypatch.syspath_prepend(str(plugin_dir))  # the checkpoint's experiment names the user's env
    try:
        exp, model = load_checkpoint(checkpoint)
    finally:
        _REGISTRY.pop(ENV_ID, None)
    assert (exp.env, model) == (ENV_ID, model_path)
    out = succeeded(str(BIN / "empg"), "eval", str(checkpoint), "--split", "eval_seen", "--episodes", "2")
    assert "eval_seen" in out and "worker logs: in the driver's output" in out


@pytest.fixture(scope="module")
def cluster(plugin_dir, tmp_path_factory):
    """A head (CPU only) and three worker nodes of two types, as separate raylets:
    gpu_runner x 2 {CPU: 2, GPU: 1, vllm_runner: 2} and gpu_learner {CPU: 1, GPU: 1, ds_learner: 1}.
    Token authentication on, as cluster/*.yaml start every node: the nodes' processes inherit
    this one's environment, and this one's Ray (which reads the auth mode once and keeps it)
    reads it again; both go back to auth disabled afterwards. The env package is on every
    node's PYTHONPATH (as a package installed on every node is), and on the driver's sys.path."""
    from ray._private.authentication_test_utils import reset_auth_token_state
    from ray.cluster_utils import Cluster

    from empg_rllib.workflows.session import ray_session

    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("PYTHONPATH", str(plugin_dir))
            env.syspath_prepend(str(plugin_dir))
            env.delenv("RAY_AUTH_TOKEN", raising=False)  # it would win over the token file
            auth = write_auth_token(tmp_path_factory.mktemp("auth"))
            for name, value in auth.items():
                env.setenv(name, value)
            reset_auth_token_state()
            local = {"node_ip_address": "127.0.0.1", "include_dashboard": False}
            cluster = Cluster(
                initialize_head=True,
                head_node_args={**local, "num_cpus": 1, "dashboard_agent_listen_port": free_port()},
            )
            try:
                # The GCS answers only a client with the token: none or another one is refused.
                token = Path(auth["RAY_AUTH_TOKEN_PATH"]).read_text()
                assert gcs_refuses(cluster.address, None) and gcs_refuses(cluster.address, "0" * 32)
                assert not gcs_refuses(cluster.address, token)
                runners = [cluster.add_node(**local, num_cpus=2, num_gpus=1, resources={"vllm_runner": 2}) for _ in range(2)]
                learner = cluster.add_node(**local, num_cpus=1, num_gpus=1, resources={"ds_learner": 1})
                with ray_session(address=cluster.address):
                    yield cluster, runners, learner
            finally:
                cluster.shutdown()
    finally:
        reset_auth_token_state()  # with the environment back: auth disabled again in this process


def cluster_experiment(tmp_path, **overrides):
    return validate({**TINY, "env": ENV_ID, "run_dir": str(tmp_path), **overrides})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_actors_land_on_the_node_types_their_custom_resources_name(cluster, model_path, tmp_path):
    """About 45 s here, plus 20 s starting the four-node cluster."""
    from empg_rllib.workflows.cluster import NodePathError, check_nodes_see
    from empg_rllib.workflows.training import build_algorithm

    _, runners, learner = cluster
    exp = cluster_experiment(
        tmp_path, num_env_runners=2, num_learners=1, resources={"env_runner": RUNNER, "learner": LEARNER}
    )
    algo = build_algorithm(exp, model_path, shared_dir=tmp_path)
    try:
        runner_nodes = algo.env_runner_group.foreach_env_runner(node_of, local_env_runner=False)
        learner_nodes = [r.get() for r in algo.learner_group.foreach_learner(node_of).result_or_errors]
        assert set(runner_nodes) <= {node.node_id for node in runners}
        assert learner_nodes == [learner.node_id]
        # The user's env, named in the experiment like a built-in, made by remote env runners.
        made = algo.env_runner_group.foreach_env_runner(
            lambda r: type(r.make_env().unwrapped).__name__, local_env_runner=False
        )
        assert made == ["EchoEnv", "EchoEnv"]
        result = algo.train()
        assert result["env_runners"]["num_episodes"] == exp.tasks_per_batch * exp.group_size
    finally:
        algo.stop()
    # A model directory the other nodes cannot see stops the run before any actor starts.
    with pytest.raises(NodePathError, match=r"node 127\.0\.0\.1 \(\w{8}\) cannot see the model directory /nowhere"):
        check_nodes_see("/nowhere", tmp_path)
    assert not list(tmp_path.glob(".empg-shared-check-*"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_node_removed_mid_run_costs_its_env_runners_a_restart_not_the_run(cluster, model_path, tmp_path):
    """About 45 s here on the cluster already started. Last in this module: the cluster keeps
    one gpu_runner node afterwards."""
    from empg_rllib.workflows.training import build_algorithm

    handle, runners, _ = cluster
    exp = cluster_experiment(tmp_path, num_env_runners=2, iterations=3, resources={"env_runner": RUNNER})
    algo = build_algorithm(exp, model_path)
    removed: list[str] = []

    def remove_a_runner_node(progress):
        # As iteration 2 starts sampling: the node of env runner 1 goes away with its raylet.
        if progress.label.startswith("iteration 2") and not removed:
            placed = algo.env_runner_group.foreach_env_runner(
                lambda r: (r.worker_index, node_of()), local_env_runner=False
            )
            doomed = dict(placed)[1]
            handle.remove_node(next(n for n in runners if n.node_id == doomed))
            removed.append(doomed)

    algo.on_sampling = remove_a_runner_node
    group = algo.env_runner_group
    results = []
    try:
        # The run goes on with the healthy runner while Ray restarts the other on the node
        # left; RLlib takes it back (and counts the restart) at the start of an iteration.
        while len(results) < exp.iterations or group.num_healthy_remote_workers() < 2:
            assert len(results) < 60, "the lost env runner never came back"
            results.append(algo.train())
        nodes_after = group.foreach_env_runner(node_of, local_env_runner=False)
    finally:
        algo.stop()
    assert removed and len(nodes_after) == 2 and removed[0] not in nodes_after
    assert set(nodes_after) <= {n.node_id for n in runners}
    for result in results:
        assert result["env_runners"]["num_episodes"] == exp.tasks_per_batch * exp.group_size
    assert results[0]["env_runners"]["num_env_runner_restarts"] == 0
    assert results[-1]["env_runners"]["num_env_runner_restarts"] >= 1
