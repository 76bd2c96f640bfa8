"""Calls from the driver onto RLlib's env runner actors.

Two things every such call needs, in one place: an exception the driver must see comes back as
a value (raised inside `foreach_env_runner`, RLlib's `apply` would exit the actor, which the
driver takes for a dead runner and replays, forever for a deterministic error), and a driver
with no healthy runner waits for RLlib to restart them, up to a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from empg_rllib.core.records import EnvFailure


@dataclass(frozen=True)
class Answer:
    """What a call on runner `worker` gave back: its value, or the error it caught."""

    worker: int
    value: Any = None
    error: str | None = None  # the caught exception's message
    error_type: str | None = None
    seconds: float = 0.0  # how long the call ran on the runner

    def describe_error(self) -> str:
        return f"{self.error_type}: {self.error}"


def errors_as_values(
    call: Callable[[Any], Any],
    caught: tuple[type[BaseException], ...] = (EnvFailure,),
    reraise: Callable[[Any, BaseException], bool] = lambda runner, err: False,
) -> Callable[[Any], Answer]:
    """`call(runner)` as a function for `foreach_env_runner(_async)` that returns an `Answer`:
    an exception of a `caught` type comes back in it, unless `reraise(runner, err)` says the
    runner itself is broken (a dead engine), which must be raised for RLlib to replace it."""

    def on_runner(runner: Any) -> Answer:
        started = time.perf_counter()
        try:
            value = call(runner)
        except caught as err:
            if reraise(runner, err):
                raise
            return Answer(runner.worker_index, error=str(err), error_type=type(err).__name__)
        return Answer(runner.worker_index, value, seconds=time.perf_counter() - started)

    return on_runner


def raise_env_failures(answers: list[Answer]) -> None:
    """An environment's error on any runner stops the run, naming the runner and the cause."""
    for answer in answers:
        if answer.error is not None:
            raise EnvFailure(f"env runner {answer.worker}: {answer.error}")


class HealthyRunners:
    """The healthy remote runners of an env runner group, waiting for RLlib to restart failed
    ones: `restore()` is asked again on every call while any runner is down, and with none
    healthy for `timeout_s` the run stops."""

    def __init__(self, group: Any, restore: Callable[[], Any], timeout_s: float) -> None:
        self.group, self.restore, self.timeout_s = group, restore, timeout_s
        self._down_since: float | None = None

    def ids(self) -> list[int]:
        """The healthy runners' ids; [] after waiting a second when there are none."""
        if self.group.num_healthy_remote_workers() < self.group.num_remote_workers():
            self.restore()
        ids = self.group.healthy_worker_ids()
        if ids:
            self._down_since = None
            return ids
        self._down_since = self._down_since or time.monotonic()
        if time.monotonic() - self._down_since > self.timeout_s:
            raise RuntimeError(f"no healthy env runner came back within {self.timeout_s:g} s")
        time.sleep(1.0)
        return []
