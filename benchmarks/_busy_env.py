"""A benchmark environment: pure Python that burns `cpu_ms` of CPU per step while holding the
GIL, as a simulator or game engine written in Python would. Not thread-safe by declaration (it
says nothing), like most environments users bring."""

from __future__ import annotations

import time
from typing import Any

from empg_envs import TextEnv


class BusyEnv(TextEnv):
    task_types = ("busy",)

    def __init__(self, split: str = "train", max_turns: int = 5, cpu_ms: float = 10.0) -> None:
        super().__init__(max_turns=max_turns, split=split)
        self.cpu_s = cpu_ms / 1000.0

    def _burn(self) -> None:
        end, x = time.thread_time() + self.cpu_s, 0
        while time.thread_time() < end:
            x += 1

    def _reset_task(self, seed: int | None, task: Any) -> tuple[str, dict[str, Any]]:
        info = {"task_id": f"busy/{seed}", "task_type": "busy", "instruction": "Keep going.", "admissible_actions": None}
        return "Start.", info

    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        self._burn()
        return "Go on.", 0.0, False, {"won": False, "score": 0.0, "invalid_action": False}
