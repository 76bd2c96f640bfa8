"""A user's environment package, written to a folder as `pip install` would leave it: the module
and a `*.dist-info` whose `entry_points.txt` declares the env id in the `empg_rllib.envs` group.

Putting that folder on sys.path (driver) or PYTHONPATH (Ray workers, through a runtime_env)
makes the id known there, without installing anything into the venv.
"""

from __future__ import annotations

from pathlib import Path

ENV_ID = "plugin-echo"
MODULE = "empg_test_plugin"
DISTRIBUTION = "empg-test-plugin"

_SOURCE = '''
"""Say the word the instruction names: a one-turn task, cheap enough for cluster tests."""

from empg_envs import TextEnv

WORDS = ("red", "green", "blue")


class EchoEnv(TextEnv):
    task_types = ("echo",)
    lexicon = WORDS

    def _reset_task(self, seed, task):
        self._word = WORDS[(seed or 0) % len(WORDS)]
        instruction = f"Say {self._word}."
        info = {"task_id": f"echo-{seed}", "task_type": "echo", "instruction": instruction,
                "admissible_actions": list(WORDS)}
        return instruction, info

    def _step(self, action):
        won = action.strip() == self._word
        info = {"won": won, "score": float(won), "invalid_action": action.strip() not in WORDS,
                "admissible_actions": list(WORDS)}
        return ("Right." if won else "Wrong."), float(won), True, info

    def expert_action(self):
        return self._word
'''


def write_env_plugin(root: Path) -> Path:
    """Write the package into `root` (made if missing); returns `root`, the folder to put on
    the path."""
    root.mkdir(parents=True, exist_ok=True)
    (root / MODULE).mkdir(exist_ok=True)
    (root / MODULE / "__init__.py").write_text(_SOURCE)
    info = root / f"{MODULE}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DISTRIBUTION}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[empg_rllib.envs]\n{ENV_ID} = {MODULE}:EchoEnv\n")
    return root
