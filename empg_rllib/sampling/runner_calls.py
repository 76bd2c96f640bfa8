"""Calls from the driver onto RLlib's env runner actors.

Two things every such call needs, in one place: an exception comes back to the driver as a
value (raised inside `foreach_env_runner`, RLlib's `apply` would exit the actor, which the
driver takes for a dead runner and replays, up to RLlib's restart limit for a deterministic
error), and a driver with no healthy runner waits for RLlib to restart them, up to a deadline.
Raised to RLlib, which replaces the runner, is only what a new runner may not meet again: a
dead vLLM engine process, the runner's memory running out, an error of Ray itself.
"""

from __future__ import annotations

import time
import traceback
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
    trace: str | None = None  # where on the runner it was raised
    env_failure: bool = False  # an environment's error (`EnvFailure`)
    seconds: float = 0.0  # how long the call ran on the runner

    def describe_error(self) -> str:
        return f"{self.error_type}: {self.error}"


class RunnerError(RuntimeError):
    """A call on an env runner raised something other than an environment's error (its engine,
    say) that replaying it on a restarted runner would raise again: the run stops."""


def runner_broken(runner: Any, err: BaseException) -> bool:
    """Whether `err` says the runner itself is broken rather than the call: its engine process
    died, its memory ran out, or Ray failed under it (a weights board, an object lost)."""
    from ray.exceptions import RayError

    return isinstance(err, (MemoryError, RayError)) or runner.engine_is_dead(err)


def errors_as_values(
    call: Callable[[Any], Any],
    reraise: Callable[[Any, BaseException], bool] = runner_broken,
) -> Callable[[Any], Answer]:
    """`call(runner)` as a function for `foreach_env_runner(_async)` that returns an `Answer`:
    an exception comes back in it, unless `reraise(runner, err)` says the runner itself is
    broken, which must be raised for RLlib to replace it."""

    def on_runner(runner: Any) -> Answer:
        started = time.perf_counter()
        try:
            value = call(runner)
        except Exception as err:
            if reraise(runner, err):
                raise
            return Answer(
                runner.worker_index,
                error=str(err),
                error_type=type(err).__name__,
                trace=traceback.format_exc(),
                env_failure=isinstance(err, EnvFailure),
            )
        return Answer(runner.worker_index, value, seconds=time.perf_counter() - started)

    return on_runner


def raise_runner_errors(answers: list[Answer]) -> None:
    """An error on any runner stops the run, naming the runner and the cause: `EnvFailure` for
    an environment's, `RunnerError` (with the runner's traceback) for anything else."""
    for answer in answers:
        if answer.error is None:
            continue
        if answer.env_failure:
            raise EnvFailure(f"env runner {answer.worker}: {answer.error}")
        raise RunnerError(f"env runner {answer.worker}: {answer.describe_error()}\n{answer.trace}")


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
