"""Sweeps (`empg sweep`): search spaces drawn and validated before Ray starts, and real Ray
Tune runs: results CSV and best experiment file, a crashed trial retried, an interrupted sweep
resumed without redoing its finished trials."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from empg_rllib.config.loading import validate
from empg_rllib.config.schema import ConfigError, Experiment
from empg_rllib.experiments import sweep as sweeps
from tests.env_doubles import FAIL_ONCE, register_doubles
from tests.helpers import SMALL

REPO = Path(__file__).resolve().parent.parent
METRIC = "evaluation/eval_unseen/success_rate"
#: One short iteration on deepsearch with the offline tiny model, evaluated at its end.
TINY = {
    **SMALL,
    "model": "tiny:",
    "env": "deepsearch",
    "tasks_per_batch": 1,
    "max_turns": 2,
    "max_new_tokens": 8,
    "evaluation": {"interval": 1, "splits": ["eval_unseen"], "episodes": 2},
}


def write_sweep(tmp_path: Path, name: str = "s", **settings) -> Path:
    data = {"name": name, "run_dir": str(tmp_path / "sweeps"), "experiment": TINY, **settings}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def check_metric(sweep_dir: Path, rows: list[dict[str, str]]) -> None:
    """Each row's metric is its trial's last reported evaluation: a share of its 2 episodes."""
    for row in rows:
        reported = json.loads((sweep_dir / row["trial"] / "result.json").read_text().splitlines()[-1])
        assert reported["evaluation/eval_unseen/episodes"] == TINY["evaluation"]["episodes"] == 2
        assert float(row[METRIC]) == reported[METRIC], row["trial"]
        assert 2 * reported[METRIC] in (0.0, 1.0, 2.0), row["trial"]


# ---- search spaces, validated before Ray starts -----------------------------------------------
def test_every_distribution_draws_within_its_space(tmp_path):
    space = {
        "empg.k": {"grid": [0.5, 2.0]},
        "empg.zeta": {"loguniform": [0.01, 1.0]},
        "empg.k_f": {"uniform": [0.5, 1.5]},
        "lr": {"choice": [1e-4, 1e-3]},
    }
    path = write_sweep(tmp_path, search_space=space, num_samples=3, seed=7)
    sweep = sweeps.load(path)
    assert [t.name for t in sweep.trials] == [f"trial_{i:03d}" for i in range(6)]
    # Tune's order: the whole grid once per sample.
    assert [t.values["empg.k"] for t in sweep.trials] == [0.5, 2.0] * 3
    for trial, exp in zip(sweep.trials, sweep.experiments):
        assert 0.01 <= trial.values["empg.zeta"] <= 1.0 and 0.5 <= trial.values["empg.k_f"] <= 1.5
        assert trial.values["lr"] in (1e-4, 1e-3)
        # Dotted keys land in their sections; each trial runs in <run_dir>/<name>/trial_NNN.
        assert (exp.empg.k, exp.empg.zeta, exp.empg.k_f, exp.lr) == tuple(
            trial.values[k] for k in ("empg.k", "empg.zeta", "empg.k_f", "lr")
        )
        assert Path(exp.run_dir) / exp.name == sweep.dir / trial.name
        assert exp.group_size == TINY["group_size"]
    assert len({t.values["empg.zeta"] for t in sweep.trials}) == 6
    # Seeded: the same file draws the same trials.
    assert [t.values for t in sweeps.load(path).trials] == [t.values for t in sweep.trials]


def test_base_experiment_from_a_file_with_fixed_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**TINY, "name": "base", "lr": 1e-4}))
    path = write_sweep(
        tmp_path,
        experiment="base.yaml",  # relative to the sweep file
        overrides={"evaluation.episodes": 3, "empg.enabled": True},
        search_space={"seed": {"grid": [0, 1]}},
    )
    sweep = sweeps.load(path)
    assert [exp.seed for exp in sweep.experiments] == [0, 1]
    assert all(exp.evaluation.episodes == 3 and exp.lr == 1e-4 for exp in sweep.experiments)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"search_space": {"empg.kk": {"grid": [1.0]}}}, "unknown key 'empg.kk'; did you mean 'empg.k'?"),
        ({"search_space": {"lr": {"normal": [0, 1]}}}, "search_space.lr: expected one of grid, choice, uniform"),
        ({"search_space": {"lr": {"grid": []}}}, "search_space.lr.grid: expected a non-empty list"),
        ({"search_space": {"lr": {"uniform": [1e-3, 1e-4]}}}, r"search_space.lr.uniform: expected \[low, high\]"),
        ({"search_space": {"lr": {"loguniform": [0, 1e-3]}}}, "search_space.lr.loguniform: the bounds must be positive"),
        ({"search_space": {"group_size": {"grid": [2, -1]}}}, r"trial_001 \(group_size=-1\): bad value for 'group_size'"),
        ({"search_space": {"run_dir": {"grid": ["a"]}}}, "search_space.run_dir: set by the sweep"),
        ({"search_space": {"lr": {"grid": [1e-3]}}, "overrides": {"lr": 1e-4}}, "'lr' is in both"),
        ({"search_space": {"lr": {"grid": [1e-3]}}, "metric": "evaluation/eval_seen/success_rate"}, "split 'eval_seen' is not in"),
        ({"search_space": {"lr": {"grid": [1e-3]}}, "metric": "evaluation/eval_unseen/succes"}, "expected evaluation/<split>/"),
        ({"search_space": {"iterations": {"grid": [3]}}, "overrides": {"evaluation.interval": 2}}, "must be a multiple"),
        ({"search_space": {"lr": {"grid": [1e-3]}}, "num_sample": 2}, "unknown key 'num_sample'; did you mean 'num_samples'"),
        ({"search_space": {"lr": {"grid": [1e-3]}}, "early_stopping": {"grace_period": 1}}, "grace_period: must be below"),
    ],
)
def test_a_bad_sweep_is_refused_naming_the_key(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        sweeps.load(write_sweep(tmp_path, **settings))


def test_shipped_sweeps_validate():
    smoke = sweeps.load(REPO / "tuned_examples/sweeps/smoke.yaml")
    assert len(smoke.trials) >= 4 and {exp.model for exp in smoke.experiments} == {"tiny:"}
    assert set(smoke.settings.search_space) >= {"empg.k", "empg.zeta"}
    gpu = sweeps.load(REPO / "tuned_examples/sweeps/alfworld-empg-k-zeta.yaml")
    assert set(gpu.settings.search_space) == {"empg.k", "empg.k_f", "empg.zeta"}
    assert {exp.env for exp in gpu.experiments} == {"alfworld"} and gpu.settings.early_stopping


def test_trial_resources_follow_the_experiment(tmp_path):
    resources = {"env_runner": {"cpus": 2, "custom": {"node_a": 1}}, "learner": {"cpus": 3}}
    path = write_sweep(
        tmp_path,
        overrides={"num_env_runners": 2, "num_learners": 1, "resources": resources},
        search_space={"lr": {"grid": [1e-3]}},
    )
    sweep = sweeps.load(path)
    config = {"experiment": sweep.base, "run_dir": str(sweep.dir), "trial": {"name": "trial_000", "values": {}, "model_path": "m"}}
    bundles = sweeps.trial_resources(config).bundles
    # The trial's driver, then RLlib's bundle per env runner and per remote learner.
    assert bundles[1:] == [{"CPU": 2, "node_a": 1}, {"CPU": 2, "node_a": 1}, {"CPU": 3}]


# ---- real Ray Tune runs ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_with_doubles(model_path):  # noqa: ARG001 - the tiny model, built once per test session
    """A 2-CPU Ray whose every worker (Tune trials are actors) knows the test environments."""
    import ray

    from empg_rllib.workflows.session import WORKER_ENV

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        # The hook runs before Ray puts the driver's directory on a worker's path.
        runtime_env={"env_vars": {**WORKER_ENV, "PYTHONPATH": str(REPO)}, "worker_process_setup_hook": register_doubles},
    )
    register_doubles()
    yield
    ray.shutdown()


def test_tiny_sweep_writes_results_and_a_best_experiment(ray_with_doubles, tmp_path):
    # DAPO drops the tiny model's all-failed groups and skips the update; it still evaluates.
    path = write_sweep(
        tmp_path,
        overrides={"iterations": 2},
        search_space={"loss": {"grid": ["grpo", "dapo"]}},
        early_stopping={"grace_period": 1},
        max_concurrent_trials=2,
    )
    sweep = sweeps.load(path)
    outcome = sweeps.run(sweep)
    rows = read_rows(outcome.csv)
    assert [(r["trial"], r["loss"]) for r in rows] == [("trial_000", "grpo"), ("trial_001", "dapo")]
    check_metric(sweep.dir, rows)
    # ASHA (rung at iteration 1) may stop the weaker trial; the stronger one runs to the end.
    assert {r["status"] for r in rows} <= {"done", "stopped early"} and "done" in {r["status"] for r in rows}
    for row in rows:
        run = sweep.dir / row["trial"]
        assert list((run / "tensorboard").glob("events.*"))
        if row["status"] == "done":
            # The run directory of a finished `empg train` run, although ASHA's max_t is
            # reached at the last iteration: Tune ends the trial only after train() returns.
            assert row["iterations"] == "2/2"
            assert (run / "checkpoint_000002" / "experiment.yaml").exists() and (run / "history.json").exists()
    # The best trial, as a file `empg train` runs unchanged: validated, only experiment keys.
    trial, value = outcome.best
    data = yaml.safe_load(outcome.best_yaml.read_text())
    assert set(data) <= set(Experiment.model_fields)
    best = validate(data)
    assert best.name == "s-best" and best.loss == trial.values["loss"] and best.iterations == 2
    assert value == max(float(r[METRIC]) for r in rows)


def test_a_crashed_trial_is_retried_without_ending_the_sweep(ray_with_doubles, tmp_path, capfd):
    flag = tmp_path / "fail-once"
    flag.write_text("")
    experiment = {**TINY, "env": FAIL_ONCE, "env_config": {"flag": str(flag)}, "max_turns": 1}
    path = write_sweep(tmp_path, experiment=experiment, search_space={"lr": {"grid": [1e-4, 1e-3]}}, max_failures=1)
    outcome = sweeps.run(sweeps.load(path))
    assert not flag.exists()  # one reset failed, in one of the trials
    assert "crashed; restarting it" in capfd.readouterr().out
    rows = read_rows(outcome.csv)
    assert [(r["status"], r["iterations"], r["error"]) for r in rows] == [("done", "1/1", "")] * 2
    trial, value = outcome.best
    assert value == max(float(r[METRIC]) for r in rows) == float(next(r for r in rows if r["trial"] == trial.name)[METRIC])
    assert outcome.best_yaml.exists()


def _run_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "empg_rllib.cli", "sweep", *args],
        cwd=REPO,
        # Its own local Ray, whatever cluster this shell may point at.
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow  # 70-90 s: two sweep processes, each starting its own Ray
@pytest.mark.ray
def test_resume_continues_an_interrupted_sweep_without_redoing_finished_trials(model_path, tmp_path):  # noqa: ARG001
    path = write_sweep(tmp_path, search_space={"empg.k": {"grid": [0.5, 1.0, 2.0]}}, max_concurrent_trials=1)
    sweep = sweeps.load(path)
    process = _run_cli(str(path))
    seen = []
    # Ctrl-C once Tune has recorded the first trial's end: Tune saves the sweep's state and stops.
    for line in process.stdout:
        seen.append(line)
        if line.startswith("trial_000 ended"):
            process.send_signal(signal.SIGINT)
            break
    output = "".join(seen) + process.communicate(timeout=120)[0]
    assert process.returncode == 1, output
    assert "continue with: empg sweep" in output
    first = sweep.dir / "trial_000" / "history.json"
    finished = {p: p.stat().st_mtime_ns for p in (first, *(sweep.dir / "trial_000").glob("checkpoint_*/*"))}

    # A new sweep over it is refused; so is resuming it from a changed file.
    with pytest.raises(FileExistsError, match="--resume"):
        sweeps.check_dir(sweep, resume=False)
    changed = write_sweep(tmp_path, search_space={"empg.k": {"grid": [0.5, 1.0, 3.0]}}, max_concurrent_trials=1)
    with pytest.raises(ConfigError, match="has changed since the sweep"):
        sweeps.check_dir(sweeps.load(changed), resume=True)
    write_sweep(tmp_path, search_space={"empg.k": {"grid": [0.5, 1.0, 2.0]}}, max_concurrent_trials=1)

    process = _run_cli(str(path), "--resume")
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    rows = read_rows(sweep.dir / sweeps.RESULTS_FILE)
    assert [(r["trial"], r["status"]) for r in rows] == [(f"trial_{i:03d}", "done") for i in range(3)]
    # trial_000 was not run again: its files are untouched, and it reported one iteration only.
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert len((sweep.dir / "trial_000" / "result.json").read_text().splitlines()) == 1
    assert "trial_000 iteration" not in output
    best = validate(yaml.safe_load((sweep.dir / sweeps.BEST_FILE).read_text()))
    assert best.name == "s-best" and best.empg.k in (0.5, 1.0, 2.0)
    check_metric(sweep.dir, rows)
    assert os.path.isdir(sweep.dir / "ray_logs")
