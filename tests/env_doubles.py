"""Test doubles: an environment that fails on purpose, for the fault-handling tests.

A module of its own, not a test file, so that a remote env runner can import it by its entry
point "tests.env_doubles:FaultyEnv": Ray puts the driver's working directory (the repository
root, where pytest runs) on every worker's sys.path.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from empg_envs import EnvConfigError, EnvCrashed, TextEnv

ERROR_PLACES = (None, "reset", "step")


class FaultyEnv(TextEnv):
    """Test double: a one-turn task (an even-length answer wins) whose engine fails on purpose.

    `crash_first`: the first N environments made in this process raise `EnvCrashed` at their
    first step, as a killed JVM would; later ones play normally. `error_at`: "reset" or "step"
    raises a plain ValueError there every time, as an environment's own bug would.
    """

    task_types = ("guess",)
    #: Environments made in this process so far; a test resets it to make crashes predictable.
    made: ClassVar[int] = 0
    #: ... and closed.
    closed: ClassVar[int] = 0

    def __init__(
        self, split: str = "train", max_turns: int = 3, crash_first: int = 0, error_at: str | None = None
    ) -> None:
        super().__init__(max_turns=max_turns, split=split)
        self.check_config(error_at=error_at)
        FaultyEnv.made += 1
        self.crashes = FaultyEnv.made <= crash_first
        self.error_at = error_at

    @classmethod
    def check_config(cls, **env_config: Any) -> None:
        super().check_config(**env_config)
        if env_config.get("error_at") not in ERROR_PLACES:
            raise EnvConfigError(f"error_at must be one of {ERROR_PLACES}, got {env_config['error_at']!r}")

    def _reset_task(self, seed: int | None, task: Any) -> tuple[str, dict[str, Any]]:
        if self.error_at == "reset":
            raise ValueError("test double: the environment's own bug at reset")
        instruction = "Answer with one word."
        info = {"task_id": f"faulty/{seed}", "task_type": "guess", "instruction": instruction, "admissible_actions": None}
        return "You are ready.", info

    def close(self) -> None:
        FaultyEnv.closed += 1
        super().close()

    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self.crashes:
            raise EnvCrashed("test double: injected engine crash")
        if self.error_at == "step":
            raise ValueError("test double: the environment's own bug at step")
        won = len(action) % 2 == 0
        return "Done.", float(won), True, {"won": won, "score": float(won), "invalid_action": False}


FAIL_ONCE = "test-fail-once"


class FailOnceEnv(FaultyEnv):
    """Test double: the first reset anywhere raises (the environment's own bug) while the file
    `flag` exists, deleting it; every later reset plays normally. Deleting a file is atomic, so
    across processes exactly one reset fails: a Tune trial restarted in a fresh actor, or any
    other trial, sees no flag."""

    def __init__(self, split: str = "train", max_turns: int = 3, flag: str = "") -> None:
        super().__init__(split=split, max_turns=max_turns)
        self.flag = flag

    def _reset_task(self, seed: int | None, task: Any) -> tuple[str, dict[str, Any]]:
        try:
            os.remove(self.flag)
        except FileNotFoundError:
            return super()._reset_task(seed, task)
        raise ValueError("test double: failing once")


def register_doubles() -> None:
    """Register FailOnceEnv in this process; a Ray `worker_process_setup_hook`, so that Tune
    trials (each an actor of its own) know the id too."""
    import empg_envs

    empg_envs.register(FAIL_ONCE, "tests.env_doubles:FailOnceEnv")
