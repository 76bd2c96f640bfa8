"""A user's environment works by default: environments that are not thread-safe are never
entered concurrently, and env workers can be processes (crashes keep their meaning, no worker
process outlives its runner)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray

import empg_envs
from empg_envs.registry import _REGISTRY
from empg_rllib.config.loading import validate
from empg_rllib.core.records import EnvFailure, EpisodeRequest, RolloutStats
from empg_rllib.sampling.engines.base import SamplingParams
from empg_rllib.sampling.engines.hf import HFEngine
from empg_rllib.sampling.env_processes import EnvProcesses
from empg_rllib.sampling.rollout import run_episodes
from empg_rllib.workflows.training import build_algorithm
from tests.concurrency_doubles import ALL, DECLARED_SAFE, DIES_ONCE, UNSAFE, register_all
from tests.helpers import SMALL

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def doubles():
    register_all()
    yield
    for env_id in ALL:
        _REGISTRY.pop(env_id, None)


def _worker_pids() -> list[int]:
    """This process's env worker processes, wherever they hang in its tree."""
    return [
        p.pid
        for p in psutil.Process().children(recursive=True)
        if "empg_rllib.sampling.env_worker" in " ".join(_cmdline(p))
    ]


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _gone(pids: list[int], within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.2)
    return False


def _on_threads(play, envs) -> list[BaseException]:
    """`play(env)` for each environment on a thread of its own, all at once; what they raised."""
    errors: list[BaseException] = []

    def run(env) -> None:
        try:
            play(env)
        except BaseException as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    workers = [threading.Thread(target=run, args=(env,)) for env in envs]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return errors


def _step_concurrently(env_id: str, threads: int = 4, steps: int = 5) -> list[BaseException]:
    def play(env) -> None:
        env.reset(seed=1)
        for _ in range(steps):
            env.step("go")

    return _on_threads(play, [empg_envs.make(env_id, turns=steps + 1, max_turns=steps + 1) for _ in range(threads)])


def test_an_environment_that_says_nothing_is_never_entered_concurrently():
    assert _step_concurrently(UNSAFE) == []
    # The control: the same environment declared thread-safe is entered by several threads.
    assert any("entered by two threads" in str(e) for e in _step_concurrently(DECLARED_SAFE))


def test_the_built_in_environments_say_whether_they_are_thread_safe():
    declared = {env_id: empg_envs.is_thread_safe(empg_envs.factory_of(env_id)[0])
                for env_id in ("alfworld", "webshop", "webshop-server", "deepsearch", "twx/coin")}
    assert declared == {"alfworld": False, "webshop": True, "webshop-server": True, "deepsearch": True,
                        "twx/coin": True}
    # A subclass drives the same engine: it shares the lock of the class that declared.
    from empg_envs.alfworld.env import AlfWorldEnv

    class MyAlfWorld(AlfWorldEnv):
        pass

    assert empg_envs.env_lock(MyAlfWorld) is empg_envs.env_lock(AlfWorldEnv)
    assert empg_envs.env_lock(AlfWorldEnv) is not empg_envs.env_lock(empg_envs.factory_of(UNSAFE)[0])


def _play(tiny_model, make_env, workers: int, requests: list[EpisodeRequest], stats: RolloutStats | None = None):
    tokenizer, model = tiny_model
    engine = HFEngine(model, tokenizer, seed=0)
    return run_episodes(engine, tokenizer, make_env, requests, SamplingParams(max_new_tokens=6), env_workers=workers,
                        stats=stats, env_id="test", seed=7)


def _record(episodes) -> list[tuple]:
    return [(e.seed, e.group, e.won, e.score, [(t.response_ids, t.action, t.reward) for t in e.turns]) for e in episodes]


def test_process_workers_play_the_same_episodes_as_thread_workers(tiny_model):
    requests = [EpisodeRequest(seed=s, group=f"g{s // 2}") for s in range(6)]
    config = {"split": "train", "max_turns": 3, "turns": 2}
    by_thread = _play(tiny_model, lambda: empg_envs.make(UNSAFE, **config), 2, requests)
    pool = EnvProcesses(2, UNSAFE, {})
    used: list[int] = []

    def make():
        env = pool.make(**config)
        used.append(env.pid)
        return env

    try:
        by_process = _play(tiny_model, make, 2, requests)
    finally:
        pool.close()
    assert len(set(used)) == 2  # environments really lived on both workers
    assert _record(by_process) == _record(by_thread)
    assert len(by_thread) == 6


def test_a_killed_worker_process_is_an_env_crash_whose_episodes_are_played_again(tiny_model, tmp_path):
    flag = tmp_path / "die"
    flag.write_text("")
    pool = EnvProcesses(2, DIES_ONCE, {"flag": str(flag), "max_turns": 3})
    stats = RolloutStats()
    requests = [EpisodeRequest(seed=s, group=f"g{s}") for s in range(4)]
    try:
        episodes = _play(tiny_model, pool.make, 2, requests, stats)
        assert not flag.exists()
    finally:
        pool.close()
    assert sorted(e.seed for e in episodes) == [0, 1, 2, 3]  # every episode played to the end
    assert stats.env_crashes >= 1 and stats.crash_retries == stats.env_crashes and stats.crashed_episodes == 0


def test_an_error_in_a_worker_process_stops_the_run_naming_the_environment_and_cause(tiny_model):
    import tests.env_doubles  # noqa: F401 - FaultyEnv raises its own bug at step

    empg_envs.register("test-faulty-process", "tests.env_doubles:FaultyEnv")
    pool = EnvProcesses(1, "test-faulty-process", {"error_at": "step"})
    try:
        with pytest.raises(EnvFailure, match=r"raised ValueError at step 1 .*the environment's own bug at step"):
            _play(tiny_model, pool.make, 1, [EpisodeRequest(seed=1)])
    finally:
        pool.close()
        _REGISTRY.pop("test-faulty-process", None)


def test_an_interrupted_process_leaves_no_worker_process(tmp_path):
    """Ctrl-C in the middle of a step: the process exits and its workers with it."""
    script = textwrap.dedent(f"""
        import signal, sys, time
        # Ctrl-C raises KeyboardInterrupt even where this test runs with SIGINT ignored (a
        # background job of a non-interactive shell inherits SIG_IGN).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.path.insert(0, {str(ROOT)!r})
        from tests.concurrency_doubles import register_all, UNSAFE
        register_all()
        from empg_rllib.sampling.env_processes import EnvProcesses
        pool = EnvProcesses(2, UNSAFE, {{"dwell_ms": 60000}})
        env = pool.make()
        print(" ".join(map(str, pool.pids())), flush=True)
        env.reset(seed=0)  # dwells for a minute in the worker
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        pids = [int(p) for p in process.stdout.readline().split()]
        assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        assert process.wait(30) != 0
        assert _gone(pids)
    finally:
        process.kill()  # a failure here must not leave its workers to the tests that follow
        process.wait()


SHARED = {**SMALL, "env": UNSAFE, "max_turns": 2, "max_new_tokens": 6, "env_config": {"turns": 2}}


@pytest.mark.parametrize("num_env_runners", [0, 1], ids=["local-runner", "remote-runner"])
def test_a_not_thread_safe_environment_trains_with_the_default_settings(ray_cluster, model_path, tmp_path, num_env_runners):
    exp = validate({**SHARED, "run_dir": str(tmp_path), "num_env_runners": num_env_runners})
    assert exp.env_workers > 1 and exp.env_worker_mode == "thread"  # the defaults
    algo = build_algorithm(exp, model_path)
    try:
        if num_env_runners:
            algo.env_runner_group.foreach_env_runner(lambda runner: register_all(), local_env_runner=False)
        result = algo.train()
    finally:
        algo.stop()
    assert result["env_runners"]["num_episodes"] == exp.tasks_per_batch * exp.group_size


def test_process_workers_end_with_their_runner_a_failed_run_or_a_killed_runner(ray_cluster, model_path, tmp_path):
    # A failed run (an environment's own error) on the driver's runner: algo.stop() ends them.
    import tests.env_doubles  # noqa: F401

    empg_envs.register("test-faulty-process", "tests.env_doubles:FaultyEnv")
    try:
        exp = validate({**SMALL, "env": "test-faulty-process", "env_config": {"error_at": "step"}, "max_turns": 2,
                        "run_dir": str(tmp_path), "env_worker_mode": "process", "env_workers": 2})
        algo = build_algorithm(exp, model_path)
        try:
            with pytest.raises(EnvFailure, match="the environment's own bug"):
                algo.train()
            assert len(_worker_pids()) == 2
        finally:
            algo.stop()
        assert _worker_pids() == []
    finally:
        _REGISTRY.pop("test-faulty-process", None)

    # A remote runner killed outright (nothing of it runs its cleanup): its workers notice.
    exp = validate({**SHARED, "run_dir": str(tmp_path / "remote"), "num_env_runners": 1,
                    "env_worker_mode": "process", "env_workers": 2})
    algo = build_algorithm(exp, model_path)
    try:
        algo.env_runner_group.foreach_env_runner(lambda runner: register_all(), local_env_runner=False)
        result = algo.train()
        assert result["env_runners"]["num_episodes"] == exp.tasks_per_batch * exp.group_size
        [pids] = algo.env_runner_group.foreach_env_runner(lambda r: r.env_worker_pids(), local_env_runner=False)
        assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
        ray.kill(algo.env_runner_group._worker_manager.actors()[1], no_restart=True)
        assert _gone(pids), f"env worker processes {pids} outlived their killed runner"
    finally:
        algo.stop()


def test_process_workers_need_env_workers():
    from empg_rllib.config.schema import ConfigError

    with pytest.raises(ConfigError, match="env_worker_mode: process .* set env_workers >= 1"):
        validate({**SHARED, "env_worker_mode": "process", "env_workers": 0})


def test_worker_processes_step_environments_that_are_not_thread_safe_in_parallel(tmp_path):
    """Two resets that only get through when both run at once (a rendezvous): on two worker
    processes they do, where threads of one process would be serialised by the class lock."""
    pool = EnvProcesses(2, UNSAFE, {"rendezvous": str(tmp_path)})
    try:
        envs = [pool.make(turns=2, max_turns=2) for _ in range(2)]
        assert envs[0].pid != envs[1].pid
        assert _on_threads(lambda env: env.reset(seed=0), envs) == []
    finally:
        pool.close()


def test_a_worker_process_that_cannot_start_is_an_error_not_a_crash(monkeypatch):
    """A broken child would die the same way on every retry: making an environment fails at once."""
    from empg_rllib.sampling import env_processes

    monkeypatch.setattr(env_processes.sys, "executable", "/bin/false")
    pool = EnvProcesses(1, UNSAFE, {})
    try:
        with pytest.raises(RuntimeError, match="did not start"):
            pool.make()
    finally:
        pool.close()
    assert _worker_pids() == []
