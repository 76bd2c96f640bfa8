"""Ray for one command: join a cluster or start a local instance, with the workers' environment
and the session's logs kept in the run directory."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from empg_rllib.util.ray_internals import session_logs_dir

#: Environment of every Ray worker: no tokenizer thread pools fighting Ray's, no hub access.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


@contextlib.contextmanager
def ray_session(
    num_cpus: int | None = None, address: str | None = None, logs_to: str | os.PathLike | None = None
) -> Iterator[None]:
    """Ray for one command: join the running cluster at `address` (default: $RAY_ADDRESS, which
    `ray job submit` sets for its entrypoint) or, with neither, start a local instance whose temp
    files stay under $RAY_TMPDIR (default: a fresh temp dir, deleted at exit).

    Worker logs (stdout and stderr of env runners and learners): on a cluster they stream to
    the driver, i.e. into the job's log under `ray job submit`, and stay in each node's
    /tmp/ray/session_latest/logs. A local instance keeps them out of the terminal (the live
    progress line) and, given `logs_to`, copies its whole logs folder to
    `logs_to/<session name>` when it ends, error or not."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, runtime_env={"env_vars": _worker_env_beside_job()})
        try:
            yield
        finally:
            ray.shutdown()
        return
    own_tmp = None
    if "RAY_TMPDIR" not in os.environ:
        own_tmp = tempfile.mkdtemp(prefix="empg-ray-")
        os.environ["RAY_TMPDIR"] = own_tmp
    # "local": a new instance even when `ray start` left one running on this machine, which
    # ray.init() would join (and then refuse num_cpus).
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        runtime_env={"env_vars": dict(WORKER_ENV)},
    )
    logs = session_logs_dir()
    try:
        yield
    finally:
        ray.shutdown()
        if logs_to is not None and logs.is_dir():
            shutil.copytree(logs, Path(logs_to) / logs.parent.name, dirs_exist_ok=True)
        if own_tmp:
            shutil.rmtree(own_tmp, ignore_errors=True)
            os.environ.pop("RAY_TMPDIR", None)


def _worker_env_beside_job() -> dict[str, str]:
    """WORKER_ENV without the variables a submitted job's runtime_env sets itself: Ray refuses
    a driver's runtime_env that repeats one of the job's keys, and the user's value wins."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    taken = ((job.get("runtime_env") or {}).get("env_vars") or {}).keys()
    return {k: v for k, v in WORKER_ENV.items() if k not in taken}
