"""Environments in worker processes (`env_worker_mode: process`).

An environment that is not thread-safe is serialised within a process (`empg_envs.make`), and
threads cannot overlap pure-Python environments anyway (the GIL). `EnvProcesses` runs the
environments of one env runner in `env_workers` child processes instead: each child hosts some
of them and answers one call at a time, so environments on different children step in parallel
while the runner's threads wait on them. To the sampler a `ProcessEnv` is an ordinary
environment.

What crashes mean does not change: a child that dies is an `EnvCrashed` for every environment it
held (the sampler plays their episodes again on fresh ones, and a fresh child replaces the dead
one); an exception an environment raises comes back as itself (or as a RuntimeError naming its
type, where it cannot be pickled) and stops the run as an `EnvFailure` naming it.

Children never outlive the runner: `close()` ends them (the runner's `stop`, and an `atexit`
hook for a process that exits without it), and a child whose parent is gone (killed, so nothing
ran) notices within a second and exits.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection
from typing import Any

import gymnasium as gym

import empg_envs
from empg_envs import EnvCrashed

#: How long a child may take to exit when asked before it is killed.
EXIT_TIMEOUT_S = 5.0
#: How long a child may take to import what it needs and say it is ready.
START_TIMEOUT_S = 300.0


class _Child:
    """One worker process and the connection to it; one call at a time."""

    def __init__(self, index: int) -> None:
        parent_end, child_end = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "empg_rllib.sampling.env_worker", str(child_end.fileno())],
            pass_fds=[child_end.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        child_end.close()
        self.conn = Connection(parent_end.detach())
        self.index = index
        # Held for a whole round trip, and to close the connection: no thread ever reads a
        # reply meant for another, or from a descriptor already reused.
        self.lock = threading.Lock()
        self.broken = False
        self.envs = 0  # environments it holds (changed under the pool's lock)
        # A child that cannot start (a broken import) would fail the same way every time: that
        # is an error that stops the run, not a crash to retry on a fresh child.
        try:
            if not self.conn.poll(START_TIMEOUT_S):
                raise EOFError
            self.conn.recv()
        except (EOFError, OSError):
            self.stop()
            raise RuntimeError(
                f"an env worker process did not start (exit code {self.process.poll()}); its error is in the "
                "runner's log above"
            ) from None

    @property
    def usable(self) -> bool:
        return not self.broken and self.process.poll() is None

    def call(self, *request: Any) -> Any:
        """Send `request`, return the answer or raise what the child raised; a child that is
        gone raises EnvCrashed. A call cut off half way (Ctrl-C) leaves the child unusable: its
        unread answer would reach the next caller."""
        with self.lock:
            if self.broken:
                raise EnvCrashed(f"env worker process {self.process.pid} was given up")
            try:
                self.conn.send(request)
                status, value = self.conn.recv()
            except (EOFError, OSError) as err:
                self.broken = True
                raise EnvCrashed(
                    f"env worker process {self.process.pid} died (exit code {self.process.poll()})"
                ) from err
            except BaseException:
                self.broken = True
                self.process.kill()
                raise
        if status == "error":
            raise value
        return value

    def hang_up(self) -> None:
        """Close the connection (the child reads EOF and exits), once no call is under way;
        a dead child's caller is woken by EOF first."""
        with self.lock:
            self.broken = True
            with contextlib.suppress(Exception):
                self.conn.close()

    def stop(self, deadline: float | None = None) -> None:
        self.hang_up()
        try:
            self.process.wait(max(0.0, (deadline or time.monotonic() + EXIT_TIMEOUT_S) - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class EnvProcesses:
    """`workers` child processes hosting environments of `env_id` with `env_config`."""

    def __init__(self, workers: int, env_id: str, env_config: dict[str, Any]) -> None:
        if workers < 1:
            raise ValueError(f"process env workers need env_workers >= 1, got {workers}")
        self.env_id, self.env_config = env_id, dict(env_config)
        self._children: list[_Child | None] = [None] * workers
        self._lock = threading.Lock()
        self._closed = False
        # A runner that exits without stop() (an error in its constructor, interpreter exit:
        # finalize runs at exit too) still ends its children.
        self._finalizer = weakref.finalize(self, EnvProcesses._stop_all, self._children)

    def make(self, **overrides: Any) -> ProcessEnv:
        """A new environment (env_config updated with `overrides`) on the child that holds the
        fewest; a dead child is replaced first."""
        spec = empg_envs.spec_of(self.env_id, **{**self.env_config, **overrides})
        return ProcessEnv(self, spec, *self.place(spec))

    def place(self, spec: tuple[Any, dict[str, Any], float]) -> tuple[_Child, int]:
        """Make the environment of `spec` on the child holding the fewest: (child, handle)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("EnvProcesses is closed")
            for i, child in enumerate(self._children):
                if child is None or not child.usable:
                    if child is not None:
                        child.stop()
                    self._children[i] = _Child(i)
            child = min(self._children, key=lambda c: c.envs)
            child.envs += 1
        try:
            return child, child.call("make", *spec)
        except BaseException:
            self.release(child)
            raise

    def release(self, child: _Child) -> None:
        with self._lock:
            child.envs -= 1

    def pids(self) -> list[int]:
        """The live children's process ids."""
        return [c.process.pid for c in self._children if c is not None and c.usable]

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._finalizer()

    @staticmethod
    def _stop_all(children: list[_Child | None]) -> None:
        """Hang up on every child at once, then wait for them against one deadline."""
        running = [c for c in children if c is not None]
        for child in running:
            child.hang_up()
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        for child in running:
            child.stop(deadline)


class ProcessEnv(gym.Env):
    """An environment living in an `EnvProcesses` child: reset, step and close are calls to it.
    An episode that starts (reset) on a child that died meanwhile starts on a fresh one: an idle
    environment of a dead child is not a crash of the episode that picks it up."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, pool: EnvProcesses, spec: tuple[Any, dict[str, Any], float], child: _Child, handle: int) -> None:
        self._pool, self._spec = pool, spec
        self._child, self._handle = child, handle
        self._closed = False

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        if not self._child.usable:
            self._pool.release(self._child)
            self._child, self._handle = self._pool.place(self._spec)
        return self._child.call("reset", self._handle, seed, options)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        return self._child.call("step", self._handle, action)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.release(self._child)
        with contextlib.suppress(EnvCrashed):  # a dead child took the environment with it
            self._child.call("close", self._handle)

    @property
    def pid(self) -> int:
        """The process that holds this environment."""
        return self._child.process.pid


def answer_error(err: BaseException) -> BaseException:
    """`err` as it can cross to the parent: itself where it pickles, else an exception of the
    same meaning (EnvCrashed stays a crash) that names its type and message."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        kind = EnvCrashed if isinstance(err, EnvCrashed) else RuntimeError
        return kind(f"{type(err).__name__}: {err}")
    return err


def wait_for_parent(parent: int, interval_s: float = 1.0) -> None:
    """Exit this process at once when its parent is gone (it was killed: nothing closed us)."""
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(interval_s)
