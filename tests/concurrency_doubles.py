"""Test doubles for environment concurrency: an environment that fails when two of its instances
are entered at the same time (as TextWorld's shared parser does), and one that kills its own
process once, as a segfaulting engine would.

A module of its own (not a test file), importable as "tests.concurrency_doubles:..." by remote
env runners and env worker processes: Ray and the workers put the repository root on sys.path.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from empg_envs import TextEnv

UNSAFE = "test-unsafe"
DECLARED_SAFE = "test-unsafe-declared-safe"
DIES_ONCE = "test-dies-once"
ALL = {
    UNSAFE: "tests.concurrency_doubles:SharedStateEnv",
    DECLARED_SAFE: "tests.concurrency_doubles:WronglyDeclaredSafeEnv",
    DIES_ONCE: "tests.concurrency_doubles:DiesOnceEnv",
}


class SharedStateEnv(TextEnv):
    """Holds state shared by all instances in a process and raises when a second call enters
    while one is inside (each call stays inside `dwell_ms`). Says nothing about thread safety.
    A task of `turns` turns whose last answer wins when it has an even length."""

    task_types = ("shared",)
    _inside: ClassVar[int] = 0
    _guard = threading.Lock()

    def __init__(
        self, split: str = "train", max_turns: int = 3, turns: int = 2, dwell_ms: float = 5.0, rendezvous: str = ""
    ) -> None:
        super().__init__(max_turns=max_turns, split=split)
        self.turns, self.dwell_s, self.rendezvous = turns, dwell_ms / 1000.0, rendezvous

    def _enter(self) -> None:
        with SharedStateEnv._guard:
            SharedStateEnv._inside += 1
            entered = SharedStateEnv._inside
        time.sleep(self.dwell_s)
        with SharedStateEnv._guard:
            SharedStateEnv._inside -= 1
        if entered > 1:
            raise RuntimeError("test double: shared state entered by two threads at once")

    def _meet(self, parties: int = 2, timeout_s: float = 30.0) -> None:
        """Wait in reset until `parties` resets (anywhere) are inside it: only resets that run at
        the same time get through."""
        folder = Path(self.rendezvous)
        (folder / f"{os.getpid()}-{id(self)}").touch()
        deadline = time.monotonic() + timeout_s
        while len(list(folder.iterdir())) < parties:
            if time.monotonic() > deadline:
                raise TimeoutError("test double: no other reset ran at the same time")
            time.sleep(0.01)

    def _reset_task(self, seed: int | None, task: Any) -> tuple[str, dict[str, Any]]:
        if self.rendezvous:
            self._meet()
        self._enter()
        info = {"task_id": f"shared/{seed}", "task_type": "shared", "instruction": "Answer twice.",
                "admissible_actions": None}
        return f"Turn 0 of task {seed}.", info

    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        self._enter()
        done = self._turn + 1 >= self.turns
        won = done and len(action) % 2 == 0
        return f"Turn {self._turn + 1}.", float(won), done, {"won": won, "score": float(won), "invalid_action": False}


class WronglyDeclaredSafeEnv(SharedStateEnv):
    """The same, declared thread-safe: the control that shows the double does detect overlap."""

    thread_safe = True


class DiesOnceEnv(SharedStateEnv):
    """Kills its own process at its first step while the file `flag` exists (deleting it, so
    that exactly one process dies across all of them)."""

    thread_safe = True

    def __init__(self, split: str = "train", max_turns: int = 3, flag: str = "") -> None:
        super().__init__(split=split, max_turns=max_turns, dwell_ms=0.0)
        self.flag = flag

    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        try:
            os.remove(self.flag)
        except FileNotFoundError:
            return super()._step(action)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


def register_all() -> None:
    import empg_envs

    for env_id, target in ALL.items():
        empg_envs.register(env_id, target)
