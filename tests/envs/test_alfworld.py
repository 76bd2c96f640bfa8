"""ALFWorld env: generated games in the real alfworld/TextWorld engine, Fast Downward expert."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("alfworld")

import empg_envs  # noqa: E402
from empg_envs.alfworld import games, generator, speedups  # noqa: E402
from empg_envs.alfworld.env import NOTHING_HAPPENS, AlfWorldEnv  # noqa: E402
from empg_envs.core import EnvConfigError, EnvCrashed, EnvError  # noqa: E402

TYPES = generator.TASK_TYPES
SPLITS = ("train", "eval_seen", "eval_unseen")


@pytest.fixture(scope="module")
def split_envs():
    """One env per split, shared so each generated game is made once per test session."""
    made = {s: empg_envs.make("alfworld", split=s, num_tasks=len(TYPES)) for s in SPLITS}
    yield made
    for env in made.values():
        env.close()


def play_expert(env, limit: int = 40) -> tuple[bool, int]:
    for n in range(1, limit + 1):
        _, reward, terminated, truncated, info = env.step(empg_envs.expert_action(env))
        assert not info["invalid_action"]
        if terminated or truncated:
            return info["won"] and reward == 1.0, n
    return False, limit


def trace(env, seed: int, steps: int = 4) -> list:
    obs, info = env.reset(seed=seed)
    out = [obs, info["task_id"], info["admissible_actions"]]
    for _ in range(steps):
        obs, _, done, _, info = env.step(env.unwrapped.expert_action())
        out += [obs, info["admissible_actions"]]
        if done:
            break
    return out


# ---- generator ---------------------------------------------------------------------------------
def test_generation_is_deterministic_and_varied():
    a = generator.generate("train", "pick_two_obj_and_place", 7)
    assert a == generator.generate("train", "pick_two_obj_and_place", 7)
    others = [generator.generate("train", "pick_two_obj_and_place", i) for i in range(8, 12)]
    others.append(generator.generate("eval_seen", "pick_two_obj_and_place", 7))
    assert all(o.pddl_problem != a.pddl_problem for o in others)


def test_generation_independent_of_hash_seed():
    code = (
        "import hashlib; from empg_envs.alfworld import generator as g; "
        "print(hashlib.md5(''.join(g.generate(s, t, 3).pddl_problem + g.generate(s, t, 3).task_desc "
        "for s in ('train', 'eval_unseen') for t in g.TASK_TYPES).encode()).hexdigest())"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": seed}, cwd=pathlib.Path(__file__).parents[2],
        ).stdout
        for seed in ("0", "4242")
    }
    assert len(outs) == 1


def test_every_type_has_seen_and_unseen_pairs():
    for task_type in TYPES:
        seen = generator.split_pairs("train", task_type)
        unseen = generator.split_pairs("eval_unseen", task_type)
        assert seen and unseen, task_type
        assert not set(seen) & generator.UNSEEN_PAIRS
        assert set(unseen) <= generator.UNSEEN_PAIRS


@pytest.mark.parametrize("split", SPLITS)
def test_generated_pairs_respect_split(split):
    for task_type in TYPES:
        for index in range(40):
            params = generator.generate(split, task_type, index).traj_data["pddl_params"]
            pair = (params["object_target"], params["parent_target"] or params["toggle_target"])
            assert (pair in generator.UNSEEN_PAIRS) == (split == "eval_unseen"), (task_type, pair)


def _object_types(problem: generator.Problem) -> set[str]:
    return {
        line.split()[2].removesuffix("Type)")
        for line in problem.pddl_problem.splitlines()
        if line.strip().startswith("(objectType ")
    }


def test_distractors_bound_the_other_object_types():
    for task_type in ("pick_and_place_simple", "look_at_obj_in_light"):
        for index in range(20):
            default = generator.generate("train", task_type, index)
            # The default range is the one every cached game was made with.
            assert default == generator.generate("train", task_type, index, distractors=(4, 7))
            params = default.traj_data["pddl_params"]
            task_objects = {params["object_target"], params["toggle_target"]} - {""}
            assert 4 <= len(_object_types(default) - task_objects) <= 7
            bare = generator.generate("train", task_type, index, distractors=(0, 0))
            assert _object_types(bare) == task_objects
            assert bare.traj_data["pddl_params"] == params
            some = generator.generate("train", task_type, index, distractors=(1, 2))
            assert 1 <= len(_object_types(some) - task_objects) <= 2


def test_games_without_distractors_are_cached_apart_and_playable():
    env = empg_envs.make(
        "alfworld", split="eval_unseen", task_types=["pick_and_place_simple"], num_tasks=2,
        expert="explorer", distractors=[0, 0],
    )
    default_root = games.GeneratedGames(pathlib.Path("cache"), env.unwrapped._engine).root
    assert env.unwrapped._generated.root.name != default_root.name
    _, info = env.reset(options={"task": 1})
    target = info["instruction"].split()[2]  # "put a/some <object> in/on <receptacle>"
    for _ in range(40):
        # Only the task's object is ever takeable in such a room.
        takes = {a.split()[1] for a in info["admissible_actions"] if a.startswith("take ")}
        assert takes <= {target}
        _, _, terminated, truncated, info = env.step(empg_envs.expert_action(env))
        if terminated or truncated:
            break
    assert info["won"]
    env.close()


def test_problem_never_starts_won():
    # No instance of the target type may start in a receptacle of the goal type.
    for task_type in ("pick_and_place_simple", "pick_two_obj_and_place", "pick_heat_then_place_in_recep"):
        for index in range(40):
            problem = generator.generate("train", task_type, index)
            params = problem.traj_data["pddl_params"]
            facts = problem.pddl_problem
            parents = {
                line.split()[1] for line in facts.splitlines()
                if line.strip().startswith("(receptacleType ") and f" {params['parent_target']}Type)" in line
            }
            for line in facts.splitlines():
                if line.strip().startswith(f"(inReceptacle {params['object_target']}_bar_"):
                    assert line.split()[2].rstrip(")") not in parents


# ---- env behaviour -----------------------------------------------------------------------------
@pytest.mark.heavy  # plays many games through the planner
@pytest.mark.parametrize("split", SPLITS)
def test_expert_solves_every_type(split_envs, split):
    env = split_envs[split]
    seen_types = []
    for index in range(len(TYPES)):
        obs, info = env.reset(options={"task": index})
        seen_types.append(info["task_type"])
        assert info["instruction"] and f"Your task is to: {info['instruction']}" in obs
        assert info["task_id"].startswith(f"alfworld/{split}/{info['task_type']}/")
        won, steps = play_expert(env)
        assert won, info["task_id"]
    assert sorted(seen_types) == sorted(TYPES)


@pytest.mark.heavy  # plays many games through the planner
def test_expert_replans_after_detours(split_envs):
    env = split_envs["train"]
    rng = random.Random(0)
    for index in range(len(TYPES)):
        _, info = env.reset(options={"task": index})
        for _ in range(3):
            info = env.step(rng.choice(info["admissible_actions"]))[4]
            if info["won"]:
                break
        assert info["won"] or play_expert(env)[0], info["task_id"]


@pytest.mark.heavy  # plays many games through the planner
def test_explorer_expert_wins_acting_only_on_what_it_has_seen():
    """The explorer never walks to a hidden object: every take/use happens where the episode's
    observations have already shown that object, and it still wins every task type."""
    env = empg_envs.make("alfworld", split="eval_unseen", num_tasks=len(TYPES) * 2, expert="explorer")
    searched = 0
    for index in range(len(TYPES) * 2):
        obs, info = env.reset(options={"task": index})
        shown = obs
        for _ in range(40):
            action = empg_envs.expert_action(env)
            assert action in info["admissible_actions"]
            if action.startswith(("take ", "use ")):
                obj = " ".join(action.split()[1:3])
                assert obj in shown, (info["task_id"], action)
            searched += action.startswith("open ")
            obs, _, terminated, truncated, info = env.step(action)
            shown = obs if obs.startswith("You arrive at") or obs.startswith("You open") else shown + obs
            if terminated or truncated:
                break
        assert info["won"], info["task_id"]
    assert searched > 0  # closed receptacles were opened to look inside
    env.close()
    with pytest.raises(EnvConfigError, match="expert"):
        empg_envs.make("alfworld", expert="oracle")


@pytest.mark.slow
@pytest.mark.parametrize("split", SPLITS)
def test_expert_solves_many(split):
    env = empg_envs.make("alfworld", split=split, num_tasks=60)
    failures = [i for i in range(60) if not (env.reset(options={"task": i}) and play_expert(env)[0])]
    assert failures == []


@pytest.mark.heavy  # plays many games through the planner
def test_same_seed_same_episode(split_envs):
    first = trace(split_envs["eval_seen"], seed=11)
    fresh = empg_envs.make("alfworld", split="eval_seen", num_tasks=len(TYPES))
    assert trace(fresh, seed=11) == first
    assert trace(fresh, seed=11) == first  # replaying a loaded game
    other = [trace(fresh, seed=s, steps=0)[1] for s in range(12, 20)]
    assert len(set(other)) > 1


def test_invalid_actions(split_envs):
    env = split_envs["train"]
    obs, info = env.reset(options={"task": 0})
    admissible = info["admissible_actions"]
    assert "help" not in admissible and "look" in admissible
    for bad in ("xyzzy", "go to fridge 99", "", "help", admissible[0].upper(), admissible[0].replace(" ", "  ")):
        obs, reward, terminated, truncated, info = env.step(bad)
        assert (obs, reward, terminated, truncated) == (NOTHING_HAPPENS, 0.0, False, False), bad
        assert info["invalid_action"] and info["admissible_actions"] == admissible
    go = next(a for a in admissible if a.startswith("go to "))
    obs, _, _, _, info = env.step(f"  {go} ")
    assert not info["invalid_action"] and obs.startswith("You arrive at")
    assert play_expert(env)[0]


def test_truncation_at_max_turns():
    env = empg_envs.make("alfworld", split="train", num_tasks=len(TYPES), max_turns=3)
    env.reset(options={"task": 1})
    results = [env.step("look")[2:4] for _ in range(3)]
    assert results == [(False, False), (False, False), (False, True)]
    with pytest.raises(EnvError):
        env.step("look")


def test_task_selection(split_envs):
    env = split_envs["eval_unseen"]
    assert env.unwrapped.tasks() == len(TYPES)
    _, info = env.reset(options={"task": 5})
    by_id = empg_envs.make("alfworld", split="train", num_tasks=1)  # another split's env plays it
    _, same = by_id.reset(options={"task": info["task_id"]})
    assert same["task_id"] == info["task_id"] and same["instruction"] == info["instruction"]
    for bad in (len(TYPES), -1, "alfworld/train/no_such_type/000001", "nonsense", 1.5):
        with pytest.raises(EnvConfigError):
            env.reset(options={"task": bad})
    # A bad task leaves the env usable: the next good one plays to a win.
    _, info = env.reset(options={"task": 0})
    assert info["task_id"].startswith("alfworld/eval_unseen/") and play_expert(env)[0]


def test_config_validation():
    sub = empg_envs.make("alfworld", split="train", task_types=["pick_cool_then_place_in_recep"], num_tasks=5)
    assert AlfWorldEnv(task_types=["pick_cool_then_place_in_recep", "pick_and_place_simple"])._types == (
        "pick_and_place_simple", "pick_cool_then_place_in_recep")
    _, info = sub.reset(options={"task": 1})
    assert info["task_type"] == "pick_cool_then_place_in_recep"
    assert info["task_id"].endswith("/000001")
    for bad in ({"task_types": ["cooking"]}, {"num_tasks": 0}, {"split": "test"}, {"data_dir": "/nonexistent"}):
        with pytest.raises(EnvConfigError):
            empg_envs.make("alfworld", **bad)
    for bad in ([1], [3, 1], [-1, 2], 2, [0.5, 1], "0,0"):
        with pytest.raises(EnvConfigError, match="distractors"):
            empg_envs.make("alfworld", distractors=bad)


def test_generated_games_are_cached(split_envs, monkeypatch):
    env = split_envs["eval_seen"]
    _, info = env.reset(options={"task": 2})
    folder = pathlib.Path(env.unwrapped._generated.folder("eval_seen", info["task_type"], 0))
    game_file = folder / games.GAME_FILE
    assert sorted(p.name for p in folder.iterdir()) == sorted([games.GAME_FILE, games.TRAJ_FILE])
    assert json.loads(game_file.read_text())["solvable"] is True
    before = game_file.stat().st_mtime_ns

    def no_generation(*args, **kwargs):
        raise AssertionError("regenerated a cached game")

    monkeypatch.setattr(generator, "generate", no_generation)
    _, again = empg_envs.make("alfworld", split="eval_seen").reset(options={"task": 2})
    assert again["instruction"] == info["instruction"]
    assert game_file.stat().st_mtime_ns == before


def test_engine_crash_is_typed_and_recoverable(split_envs):
    env = empg_envs.make("alfworld", split="eval_seen")
    env.reset(options={"task": 0})
    # The planner library behind the live game goes away, as when Fast Downward dies.
    env.unwrapped._engine._pddl._pddl_state.downward_lib = None
    go = next(a for a in env.unwrapped._admissible if a.startswith("go to "))
    with pytest.raises(EnvCrashed):
        env.step(go)
    with pytest.raises(EnvCrashed):
        env.reset(options={"task": 0})
    fresh = empg_envs.make("alfworld", split="eval_seen")
    fresh.reset(options={"task": 0})
    assert play_expert(fresh)[0]


@pytest.mark.heavy  # plays many games through the planner
def test_speedups_do_not_change_games(split_envs):
    env = split_envs["train"]
    argv = list(sys.argv)
    seeds = (5, 11, 23)
    speedups.uninstall()
    try:
        slow = [wandering_trace(env, seed) for seed in seeds]
    finally:
        speedups.install()
        sys.argv = list(argv)  # the library's translator overwrites it
    assert [wandering_trace(env, seed) for seed in seeds] == slow
    assert sys.argv == argv


def wandering_trace(env, seed: int, steps: int = 10) -> list:
    """Observations and admissible actions of a game played by turns of the expert and of a
    seeded random pick among the admissible actions (feedback of every kind of command)."""
    rng = random.Random(seed)
    obs, info = env.reset(seed=seed)
    out = [obs, info["task_id"], info["admissible_actions"]]
    for step in range(steps):
        action = env.unwrapped.expert_action() if step % 2 else rng.choice(info["admissible_actions"])
        obs, _, done, _, info = env.step(action)
        out += [action, obs, info["admissible_actions"]]
        if done:
            break
    return out


@pytest.mark.heavy  # plays many games through the planner
def test_official_data_layout(split_envs, tmp_path, monkeypatch):
    """A folder in ALFWorld's json_2.1.1 layout (built from generated games) is played as is."""
    expected = {}
    for split, official in games.OFFICIAL_SPLITS.items():
        env = split_envs[split]
        for index in (0, 1):
            _, info = env.reset(options={"task": index})
            src = pathlib.Path(env.unwrapped._generated.folder(split, info["task_type"], 0))
            trial = tmp_path / "json_2.1.1" / official / f"{info['task_type']}-X-None-Y-{index}" / "trial_T0"
            shutil.copytree(src, trial)
            expected.setdefault(split, []).append(info["instruction"])
    # Skipped like alfworld's loader does: movable receptacles, and games not marked solvable.
    shutil.copytree(trial, trial.parents[1] / "pick_and_place_with_movable_recep-A-B-C-1" / "trial_T0")
    unsolvable = trial.parents[1] / "pick_and_place_simple-Z-None-Z-9" / "trial_T0"
    shutil.copytree(trial, unsolvable)
    game = json.loads((unsolvable / games.GAME_FILE).read_text())
    del game["solvable"]
    (unsolvable / games.GAME_FILE).write_text(json.dumps(game))

    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path))
    for split in SPLITS:
        env = empg_envs.make("alfworld", split=split)
        assert env.unwrapped.tasks() == 2
        instructions = []
        for index in range(2):
            _, info = env.reset(options={"task": index})
            assert info["task_id"].startswith(f"alfworld/official/{games.OFFICIAL_SPLITS[split]}/")
            instructions.append(info["instruction"])
            assert play_expert(env)[0]
        assert sorted(instructions) == sorted(expected[split])
        _, again = env.reset(options={"task": info["task_id"]})
        assert again["instruction"] == info["instruction"]
    digest = hashlib.md5(str(trace(empg_envs.make("alfworld", split="train"), seed=1)).encode()).hexdigest()
    explicit = empg_envs.make("alfworld", split="train", data_dir=str(tmp_path))
    assert hashlib.md5(str(trace(explicit, seed=1)).encode()).hexdigest() == digest


@pytest.mark.parametrize(
    ("env_config", "named"),
    [({"distractors": [0]}, "distractors"), ({"task_types": ["pick_and_fly"]}, "task_types"), ({"expert": "oracle"}, "expert")],
)
def test_bad_settings_fail_the_check_that_runs_before_any_environment_is_made(env_config, named):
    with pytest.raises(empg_envs.EnvConfigError, match=named):
        empg_envs.check_config("alfworld", **env_config)
    empg_envs.check_config("alfworld", distractors=[0, 0], task_types=["look_at_obj_in_light"], expert="explorer")
