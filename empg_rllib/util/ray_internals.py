"""Private Ray internals the project relies on, each behind one function.

UPGRADE HAZARD: nothing here is Ray's public API (checked against Ray 2.60). When Ray is
upgraded, run the tests that call these (tests/test_cli.py for the logs folder, tests/test_async.py for the in-flight calls) first; a
renamed attribute fails here, in one place, with the name of what moved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def session_logs_dir() -> Path:
    """The logs folder of the Ray session this process started or joined (no public API names it)."""
    import ray

    return Path(ray._private.worker.global_worker.node.get_logs_dir_path())


def calls_in_flight(env_runner_group: Any, worker: int, tag: str) -> int:
    """Asynchronous calls tagged `tag` that RLlib's actor manager holds for env runner `worker`
    (RLlib 2.60 keeps the count on its private per-actor state; a failed actor's calls are
    dropped from it)."""
    state = env_runner_group._worker_manager._remote_actor_states.get(worker)
    return state.get_num_in_flight_requests(tag) if state is not None else 0
