"""Game files on disk: the generated-game cache and the official ALFWorld data layout.

A game is a folder with `game.tw-pddl` (domain, grammar with the task text, problem, `solvable`,
`walkthrough`) and `traj_data.json` next to it, the layout alfworld's own loader reads.
Generated games live under `<cache>/generated-v<N>/<split>/<task type>/<index>/` (a folder
`generated-v<N>-distractors<lo>-<hi>` for a non-default number of distractors); they are
written once (temp file + `os.replace`, `game.tw-pddl` last, so its presence means complete) and
reused by every later process. Concurrent writers produce identical bytes, so a race is harmless.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import tempfile
from typing import Any

from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH

from empg_envs.alfworld import generator
from empg_envs.alfworld.engine import Engine
from empg_envs.core import EnvError

GAME_FILE = "game.tw-pddl"
TRAJ_FILE = "traj_data.json"
#: Official split folders under $ALFWORLD_DATA/json_2.1.1, per split of this package.
OFFICIAL_SPLITS: dict[str, str] = {
    "train": "train",
    "eval_seen": "valid_seen",
    "eval_unseen": "valid_unseen",
}
# Resamples of an unsolvable draw; draws are solvable by construction, so this is a backstop.
_MAX_ATTEMPTS = 20


@dataclasses.dataclass(frozen=True)
class GameRef:
    """A playable game: its file, task id and task type."""

    task_id: str
    task_type: str
    path: pathlib.Path
    #: Its `walkthrough` is our planner's plan from the start (official ones come from
    #: alfworld-generate and are not relied on).
    planned: bool = False


@functools.cache
def _logic_files() -> tuple[str, str]:
    with open(ALFRED_PDDL_PATH) as domain, open(ALFRED_TWL2_PATH) as grammar:
        return domain.read(), grammar.read()


def _game_json(problem: generator.Problem) -> dict[str, Any]:
    domain, grammar = _logic_files()
    return {
        "pddl_domain": domain,
        "grammar": grammar.replace("UNKNOWN GOAL", problem.task_desc),
        "pddl_problem": problem.pddl_problem,
    }


def _write_atomic(path: pathlib.Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class GeneratedGames:
    """Generated games of one cache folder, made on first use with `engine` checking each."""

    def __init__(
        self,
        root: pathlib.Path,
        engine: Engine,
        distractors: tuple[int, int] = generator.DEFAULT_DISTRACTORS,
    ) -> None:
        name = f"generated-v{generator.GENERATOR_VERSION}"
        if distractors != generator.DEFAULT_DISTRACTORS:
            name += "-distractors{}-{}".format(*distractors)
        self.root = root / name
        self._engine = engine
        self._distractors = distractors

    def folder(self, split: str, task_type: str, index: int) -> pathlib.Path:
        return self.root / split / task_type / f"{index:06d}"

    def get(self, split: str, task_type: str, index: int) -> GameRef:
        """The game (split, task_type, index), generated and cached if not on disk yet."""
        folder = self.folder(split, task_type, index)
        ref = GameRef(generator.task_id(split, task_type, index), task_type, folder / GAME_FILE,
                      planned=True)
        if not ref.path.exists():
            self._generate(split, task_type, index, folder)
        return ref

    def _generate(self, split: str, task_type: str, index: int, folder: pathlib.Path) -> None:
        for attempt in range(_MAX_ATTEMPTS):
            problem = generator.generate(split, task_type, index, attempt, self._distractors)
            game = _game_json(problem)
            walkthrough = self._solve(game)
            if walkthrough:
                break
        else:
            raise EnvError(f"no solvable {task_type} game for {split}/{index} in {_MAX_ATTEMPTS} draws")
        game.update(solvable=True, walkthrough=walkthrough)
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / TRAJ_FILE, problem.traj_data)
        _write_atomic(folder / GAME_FILE, game)

    def _solve(self, game: dict[str, Any]) -> list[str]:
        """The planner's walkthrough; empty if unsolvable or already won at reset."""
        try:
            self._engine.load(game)
        except KeyError:
            # Fast Downward proves the goal unreachable and emits a dummy task, which TextWorld
            # then fails to read with KeyError('val1').
            return []
        if self._engine.reset()["won"]:
            return []
        return self._engine.plan()


@functools.cache
def official_games(data_dir: str, split: str) -> tuple[GameRef, ...]:
    """Games of `split` under `data_dir`/json_2.1.1, filtered as alfworld's AlfredTWEnv does."""
    base = pathlib.Path(data_dir) / "json_2.1.1" / OFFICIAL_SPLITS[split]
    refs = []
    for root, _dirs, files in sorted(os.walk(base)):
        # TextWorld supports neither movable receptacles nor slicing goals.
        if TRAJ_FILE not in files or GAME_FILE not in files or "movable" in root or "Sliced" in root:
            continue
        with open(os.path.join(root, GAME_FILE)) as f:
            if not json.load(f).get("solvable", False):
                continue
        with open(os.path.join(root, TRAJ_FILE)) as f:
            task_type = json.load(f)["task_type"]
        if task_type not in generator.TASK_TYPES:
            continue
        rel = pathlib.Path(root).relative_to(base).as_posix()
        refs.append(GameRef(f"alfworld/official/{OFFICIAL_SPLITS[split]}/{rel}", task_type,
                            pathlib.Path(root) / GAME_FILE))
    return tuple(refs)
