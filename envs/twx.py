"""`twx/<game>`: TextWorld-Express games (cookingworld, twc, coin, mapreader, ...).

Each env owns one JVM (TWX runs through py4j); `close()` shuts it down, and a JVM that dies
mid-episode surfaces as `EnvCrashed`.

Splits map onto TWX's seed folds (TWX's dev/test folds also swap in unseen objects and
ingredients, so only the train fold can give an in-distribution eval):

- train:       train-fold seeds 0-899
- eval_seen:   train-fold seeds 900-999 (same distribution, held-out games)
- eval_unseen: test-fold seeds 20000-20999 (unseen games and unseen objects)

Reward is TWX's score delta (its sum is the final score, 1.0 on success); `won` is TWX's
`tasksuccess`. The expert follows the gold path that TWX generates at reset.
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

from py4j.protocol import Py4JError
from textworld_express import TextWorldExpressEnv as _TWXEngine

from empg_envs.core import EnvConfigError, EnvCrashed, TextEnv

GAMES: tuple[str, ...] = (
    "cookingworld", "twc", "coin", "mapreader", "arithmetic", "sorting", "simonsays",
    "peckingorder",
)
# Small worlds whose gold paths fit the default turn limit; TWX's own defaults (game_params="")
# make cookingworld paths of up to ~130 steps.
DEFAULT_GAME_PARAMS: dict[str, str] = {
    "cookingworld": "numLocations=3,numIngredients=2,numDistractorItems=5,includeDoors=0,"
                    "limitInventorySize=0",
    "twc": "numLocations=2,numItemsToPutAway=3,includeDoors=0,limitInventorySize=0",
    "coin": "numLocations=5,numDistractorItems=0,includeDoors=1,limitInventorySize=0",
    "mapreader": "numLocations=8,maxDistanceApart=3,maxDistractorItemsPerLocation=2,"
                 "includeDoors=0,limitInventorySize=0",
}
#: Protocol split -> (TWX fold, first seed offset, last seed offset) within that fold's seeds.
SPLIT_FOLDS: dict[str, tuple[str, int, int]] = {
    "train": ("train", 0, 900),
    "eval_seen": ("train", 900, 1000),
    "eval_unseen": ("test", 0, 1000),
}
_TWX_STEP_LIMIT = 10**9  # TextEnv truncates; TWX must never end an episode on its own count


def _params_string(game_params: str | dict[str, Any]) -> str:
    """TWX's "key=int,key=int" form; TWX checks names and ranges but not this syntax."""
    if isinstance(game_params, str):
        pairs = [p.partition("=")[::2] for p in game_params.split(",") if p.strip()]
    elif isinstance(game_params, dict):
        pairs = [(k, int(v) if isinstance(v, bool) else v) for k, v in game_params.items()]
    else:
        raise EnvConfigError(f"game_params must be a str or dict, got {type(game_params).__name__}")
    out = []
    for key, value in pairs:
        key, value = str(key).strip(), str(value).strip()
        if not re.fullmatch(r"-?\d+", value):
            raise EnvConfigError(f"game_params: {key} needs an integer value, got {value!r}")
        out.append(f"{key}={value}")
    return ",".join(out)


class TextWorldExpressEnv(TextEnv):
    """One TWX game; see the module docstring for splits, reward and expert."""

    # Each instance drives its own TWX engine (its own JVM gateway).
    thread_safe = True

    task_types = GAMES

    def __init__(
        self,
        variant: str,
        split: str = "train",
        max_turns: int = 50,
        game_params: str | dict[str, Any] | None = None,
    ) -> None:
        super().__init__(max_turns=max_turns, split=split)
        self.check_config(variant=variant)
        self.game = variant
        self.task_types = (variant,)
        self.game_params = _params_string(
            DEFAULT_GAME_PARAMS.get(variant, "") if game_params is None else game_params
        )
        self._engine: _TWXEngine | None = _TWXEngine(envStepLimit=_TWX_STEP_LIMIT)
        try:
            self._call("load", variant, self.game_params)
        except ValueError as err:  # TWX reports bad parameters as a message
            self.close()
            raise EnvConfigError(f"game_params {self.game_params!r}: {err}") from err
        fold_seeds = {
            "train": list(self._call("getValidSeedsTrain")),
            "test": list(self._call("getValidSeedsTest")),
        }
        self._seeds = {
            split: [int(s) for s in fold_seeds[fold][lo:hi]]
            for split, (fold, lo, hi) in SPLIT_FOLDS.items()
        }
        self._valid: list[str] = []
        self._gold: list[str] = []
        self._gold_pos = 0

    @classmethod
    def check_config(cls, **env_config: Any) -> None:
        """TextEnv's checks, the game (the id's suffix) and `game_params`' syntax; whether
        TWX accepts the parameters is known only once the JVM loads the game."""
        super().check_config(**env_config)
        if "variant" in env_config and env_config["variant"] not in GAMES:
            raise EnvConfigError(f"unknown TWX game {env_config['variant']!r}; games: {', '.join(GAMES)}")
        if env_config.get("game_params") is not None:
            _params_string(env_config["game_params"])

    def tasks(self) -> int:
        """Number of games (TWX seeds) in this env's split."""
        return len(self._seeds[self.split])

    def close(self) -> None:
        """Shut the JVM down (idempotent)."""
        engine, self._engine = self._engine, None
        if engine is None:
            return
        proc = engine._gateway.java_process
        if proc.poll() is None:
            try:
                engine.close()
            except (Py4JError, OSError):
                pass  # it died meanwhile; kill() below makes sure
        else:
            # Keeps py4j from calling the dead JVM (and logging each failure) when the
            # engine's Java object handles are garbage-collected.
            engine._gateway._gateway_client.is_connected = False
            engine._gateway.shutdown_callback_server()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # ---- engine calls -------------------------------------------------------------------
    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call an engine method; a closed, dead or failing JVM becomes EnvCrashed."""
        engine = self._engine
        if engine is None:
            raise EnvCrashed(f"twx/{self.game}: the engine is closed; make a new env")
        exit_code = engine._gateway.java_process.poll()
        if exit_code is not None:
            # Checked first: calling into a dead JVM makes py4j log pages of tracebacks.
            self.close()
            raise EnvCrashed(f"twx/{self.game}: the TWX JVM exited ({exit_code}); make a new env")
        try:
            return getattr(engine, method)(*args, **kwargs)
        except Py4JError as err:
            self.close()
            raise EnvCrashed(
                f"twx/{self.game}: the TWX JVM failed ({err}); make a new env"
            ) from err

    def _task_seed(self, task: Any) -> tuple[str, int]:
        seeds = self._seeds[self.split]
        if task is None:
            return self.split, seeds[int(self.np_random.integers(len(seeds)))]
        if isinstance(task, int) and not isinstance(task, bool) and 0 <= task < len(seeds):
            return self.split, seeds[task]
        prefix = f"twx/{self.game}/"
        if isinstance(task, str) and task.startswith(prefix):
            split, _, seed = task[len(prefix):].partition("/")
            if seed.isdigit() and int(seed) in self._seeds.get(split, ()):
                return split, int(seed)
        raise EnvConfigError(
            f"bad task {task!r}: expected an index in [0, {len(seeds)}) "
            f"or a twx/{self.game} task_id"
        )

    # ---- TextEnv ------------------------------------------------------------------------
    def _reset_task(self, seed: int | None, task: Any) -> tuple[str, dict[str, Any]]:
        split, twx_seed = self._task_seed(task)
        fold = SPLIT_FOLDS[split][0]
        obs, infos = self._call("reset", seed=twx_seed, gameFold=fold, generateGoldPath=True)
        gold = list(self._call("getGoldActionSequence"))
        # A leading "look around" repeats the observation that reset already shows.
        self._gold = gold[1:] if gold[:1] == ["look around"] else gold
        self._gold_pos = 0
        self._valid = sorted(infos["validActions"])
        instruction = infos["taskDescription"]
        info = {
            "task_id": f"twx/{self.game}/{split}/{twx_seed:05d}",
            "task_type": self.game,
            "instruction": instruction,
            "admissible_actions": list(self._valid),
        }
        return f"{instruction}\n\n{obs}", info

    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        action = " ".join(action.split())
        invalid = action not in self._valid
        self._skip_invalid_gold()
        if self._gold_pos < len(self._gold) and action == self._gold[self._gold_pos]:
            self._gold_pos += 1
        obs, reward, done, infos = self._call("step", action)
        self._valid = sorted(infos["validActions"])
        info = {
            "won": bool(infos["tasksuccess"]),
            "lost": bool(infos["taskfailure"]),
            "score": float(infos["score"]),
            "invalid_action": invalid,
            "admissible_actions": list(self._valid),
        }
        return obs, float(reward), bool(done), info

    def _skip_invalid_gold(self) -> None:
        # TWX's gold paths hold a few actions that are invalid where they stand (e.g. opening a
        # cupboard that is not there); they would do nothing, so the path goes on without them.
        while self._gold_pos < len(self._gold) and self._gold[self._gold_pos] not in self._valid:
            self._gold_pos += 1

    def expert_action(self) -> str:
        """The next valid action of TWX's gold path.

        The path assumes the episode followed it: after another valid action the expert may
        no longer win (invalid actions change nothing and do not matter).
        """
        self._skip_invalid_gold()
        if self._gold_pos < len(self._gold):
            return self._gold[self._gold_pos]
        return "look around"  # off the path with nothing left to follow: a harmless action
