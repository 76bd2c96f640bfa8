"""Ray Tune sweeps over experiment keys: `empg sweep tuned_examples/sweeps/X.yaml`.

A sweep file names a base experiment, fixed overrides of it and a search space over any
experiment key (dotted for sections). Every trial is drawn (Tune's own variant generator,
seeded) and validated like an experiment file before Ray starts, so a typo or a bad value
stops the sweep at once and names the key. Tune then runs each trial as one `training.train`
in its own run directory, `<run_dir>/<name>/trial_NNN`: checkpoints, TensorBoard logs and
`history.json` as `empg train` writes them, so `empg eval` and TensorBoard work per trial.

Why a function trainable and not the EMPG Algorithm class: the class would checkpoint through
Tune (RLlib's state only: no learner backend state, no experiment.yaml for `empg eval`), and a
trial's experiment keys (lr, runner counts, ...) reach RLlib only through
`EMPGConfig.experiment_from`, which training.train already applies.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

from empg_rllib.config.loading import base_experiment, read_file, validate, with_values
from empg_rllib.config.schema import ConfigError, Experiment
from empg_rllib.core import metrics
from empg_rllib.core.metrics import EVALUATION_KEYS, SUMMARY_KEYS
from empg_rllib.experiments.tables import value_cell
from empg_rllib.util.environ import environ_set

if TYPE_CHECKING:
    from ray.tune import PlacementGroupFactory, ResultGrid

#: Experiment keys the sweep sets for each trial (its run directory).
SWEEP_OWNED = ("name", "run_dir")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")
#: The resolved sweep, written at the start and compared on `--resume`.
RESOLVED_FILE = "sweep.yaml"
RESULTS_FILE = "results.csv"
BEST_FILE = "best.yaml"


class EarlyStopping(BaseModel):
    """ASHA (asynchronous successive halving) on the sweep's metric, per training iteration."""

    model_config = ConfigDict(extra="forbid")
    grace_period: int = Field(1, ge=1, description="iterations every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="keep the best 1/reduction_factor at each rung")


class SweepFile(BaseModel):
    """What a `tuned_examples/sweeps/*.yaml` file may say."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None  # default: the file's stem
    run_dir: str = "runs/sweeps"  # the sweep writes <run_dir>/<name>
    experiment: str | dict[str, Any]  # a path (relative to the sweep file) or an inline mapping
    overrides: dict[str, Any] = {}  # dotted keys fixed for every trial
    search_space: dict[str, dict[str, Any]] = Field(min_length=1)
    num_samples: int = Field(1, ge=1)  # Tune's meaning: the grid is repeated, sampled keys drawn anew
    seed: int = 0  # of the sampled values
    metric: str = metrics.evaluation("eval_unseen", metrics.SUCCESS_RATE)
    mode: Literal["max", "min"] = "max"
    early_stopping: EarlyStopping | None = None
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: as many as the cluster's resources fit
    max_failures: int = Field(1, ge=0)  # restarts of a crashed trial (from its last checkpoint, if any)


@dataclass(frozen=True)
class Trial:
    name: str
    values: dict[str, Any]  # the searched keys' values
    experiment: dict[str, Any]  # the whole experiment, as a file would say it


@dataclass(frozen=True)
class Sweep:
    path: Path
    name: str
    dir: Path  # absolute: Tune's storage path is <dir.parent>, its experiment <dir.name>
    settings: SweepFile
    base: dict[str, Any]  # the base experiment with the fixed overrides applied
    trials: list[Trial]
    experiments: list[Experiment]  # validated, one per trial

    def resolved(self) -> dict[str, Any]:
        """Everything that decides what the trials run: stored with the sweep, compared on resume."""
        settings = self.settings.model_dump(exclude={"experiment", "overrides"})
        return {**settings, "name": self.name, "experiment": self.base,
                "trials": [{"name": t.name, "values": t.values} for t in self.trials]}


@dataclass(frozen=True)
class Outcome:
    rows: list[dict[str, Any]]  # one per trial, in trial order
    unfinished: int  # trials neither ended nor failed: the sweep was interrupted
    best: tuple[Trial, float] | None  # with its metric value; None when unfinished or none reported it
    csv: Path
    best_yaml: Path | None


def tune_domain(key: str, spec: dict[str, Any]) -> Any:
    """The Tune search-space object of one `search_space` entry, e.g. `{loguniform: [1e-5, 1e-3]}`."""
    from ray import tune

    where = f"search_space.{key}"
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: expected one of {', '.join(DISTRIBUTIONS)} (e.g. {{grid: [1, 2]}}), got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}.{kind}: expected a non-empty list of values, got {args!r}")
        return tune.grid_search(args) if kind == "grid" else tune.choice(args)
    numbers = isinstance(args, list) and len(args) == 2 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in args
    )
    if not numbers or not args[0] < args[1]:
        raise ConfigError(f"{where}.{kind}: expected [low, high] with low < high, got {args!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"{where}.loguniform: the bounds must be positive, got {args!r}")
    return tune.uniform(*args) if kind == "uniform" else tune.loguniform(*args)


def draw(search_space: dict[str, dict[str, Any]], num_samples: int, seed: int) -> list[dict[str, Any]]:
    """Each trial's values, as Tune's BasicVariantGenerator draws them: every grid point once per
    sample, sampled keys drawn anew for each trial."""
    from ray.tune.search.variant_generator import generate_variants

    space = {key: tune_domain(key, spec) for key, spec in search_space.items()}
    rng = np.random.default_rng(seed)
    points = []
    for _ in range(num_samples):
        points.extend(resolved for _, resolved in generate_variants(space, random_state=rng))
    return points


def _check_metric(metric: str, trial: Trial, exp: Experiment) -> None:
    parts = metric.split("/")
    if parts[0] != metrics.EVALUATION:
        if metric not in SUMMARY_KEYS.values():
            raise ConfigError(
                f"metric {metric!r}: expected evaluation/<split>/<{'|'.join(EVALUATION_KEYS)}> "
                f"or one of {', '.join(SUMMARY_KEYS.values())}"
            )
        return
    if len(parts) != 3 or parts[2] not in EVALUATION_KEYS:
        raise ConfigError(f"metric {metric!r}: expected evaluation/<split>/<{'|'.join(EVALUATION_KEYS)}>")
    where = f"{trial.name}: metric {metric!r}"
    if parts[1] not in exp.evaluation.splits:
        raise ConfigError(f"{where}: split {parts[1]!r} is not in evaluation.splits {exp.evaluation.splits}")
    if exp.evaluation.interval == 0:
        raise ConfigError(f"{where}: set evaluation.interval, the iterations between evaluations")
    if exp.iterations % exp.evaluation.interval:
        # Otherwise a trial's last result has no evaluation to rank it by.
        raise ConfigError(
            f"{where}: iterations ({exp.iterations}) must be a multiple of evaluation.interval "
            f"({exp.evaluation.interval}), so that every trial ends with an evaluation"
        )


def load(path: str | os.PathLike) -> Sweep:
    """Read a sweep file; draw and validate every trial (no Ray needed)."""
    path, settings = read_file(path, SweepFile)
    for section, keys in (("overrides", settings.overrides), ("search_space", settings.search_space)):
        for key in keys:
            if key in SWEEP_OWNED:
                raise ConfigError(f"{section}.{key}: set by the sweep (each trial runs in <run_dir>/<name>/trial_NNN)")
    if both := sorted(set(settings.overrides) & set(settings.search_space)):
        raise ConfigError(f"{both[0]!r} is in both overrides and search_space")
    base = with_values(base_experiment(settings.experiment, path), settings.overrides)
    name = settings.name or path.stem
    sweep_dir = (Path(settings.run_dir) / name).resolve()
    points = draw(settings.search_space, settings.num_samples, settings.seed)
    width = max(3, len(str(len(points) - 1)))
    trials, experiments = [], []
    for i, values in enumerate(points):
        trial = Trial(f"trial_{i:0{width}d}", values, with_values(base, values))
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
        try:
            exp = validate({**trial.experiment, "name": trial.name, "run_dir": str(sweep_dir)})
        except ConfigError as err:
            raise ConfigError(f"{trial.name} ({shown}): {err}") from None
        _check_metric(settings.metric, trial, exp)
        trials.append(trial)
        experiments.append(exp)
    if settings.early_stopping and settings.early_stopping.grace_period >= max(e.iterations for e in experiments):
        raise ConfigError("early_stopping.grace_period: must be below the trials' iterations")
    return Sweep(path, name, sweep_dir, settings, base, trials, experiments)


def prepare(path: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> Sweep:
    """Everything `empg sweep` checks before Ray starts: the file and every trial (`load`), the
    sweep directory (`check_dir`, after deleting an earlier sweep with `overwrite`), and that
    every trial's model exists (`model_paths`, for a new sweep)."""
    sweep = load(path)
    if overwrite:
        clear_dir(sweep)
    check_dir(sweep, resume)
    if not resume:
        model_paths(sweep)
    return sweep


def check_dir(sweep: Sweep, resume: bool) -> None:
    """Refuse a new sweep over an earlier one (their trial directories would mix), and a resume
    of nothing or of a sweep whose file has changed since it started."""
    from ray import tune

    stored = sweep.dir / RESOLVED_FILE
    if not resume:
        if sweep.dir.exists() and any(sweep.dir.iterdir()):
            raise FileExistsError(
                f"{sweep.dir} holds an earlier sweep. Continue it with --resume, or start over "
                "with --overwrite (deletes that directory)."
            )
        return
    if not tune.Tuner.can_restore(str(sweep.dir)) or not stored.exists():
        raise FileNotFoundError(f"--resume: no sweep to continue in {sweep.dir}")
    if yaml.safe_load(stored.read_text()) != _plain(sweep.resolved()):
        raise ConfigError(
            f"--resume: {sweep.path} has changed since the sweep in {sweep.dir} started (compare with "
            f"{stored}); restore the file, or start over with --overwrite"
        )


def _plain(data: Any) -> Any:
    """As YAML reads it back (tuples become lists), for comparing with the stored sweep."""
    return yaml.safe_load(yaml.safe_dump(data, sort_keys=False))


def trial_experiment(config: dict[str, Any]) -> Experiment:
    """A trial's experiment from its Tune config; its run directory is Tune's trial directory."""
    trial = config["trial"]
    data = with_values(config["experiment"], trial["values"])
    return validate({**data, "name": trial["name"], "run_dir": config["run_dir"]})


def run_trial(config: dict[str, Any]) -> None:
    """Tune's function trainable: one `training.train` run, each iteration reported to Tune."""
    from ray import tune

    from empg_rllib.workflows.runs import SFT_MODEL, latest_checkpoint
    from empg_rllib.workflows.sft import warm_start
    from empg_rllib.workflows.training import train

    exp = trial_experiment(config)
    run_dir = exp.directory
    model_path = warm_start(exp, config["trial"]["model_path"], run_dir / SFT_MODEL)
    # A trial Tune starts again (a crash within max_failures, or --resume of an interrupted
    # sweep) continues from its own last checkpoint.
    resume = latest_checkpoint(run_dir) is not None
    # Tune ends a trial's process as soon as a result stops it (ASHA at max_t, the last
    # iteration), so the last result waits until train() has written the final checkpoint and
    # history.json. RLlib's own training_iteration is in the scalars: ASHA counts the
    # algorithm's iterations across restarts (Tune's counter would start again at 1).
    last: list[dict[str, float]] = []

    def report(iteration: int, scalars: dict[str, float]) -> None:
        if iteration < exp.iterations:
            tune.report(scalars)
        else:
            last.append(scalars)

    train(exp, model_path, resume=resume, on_iteration=report)
    for scalars in last:
        tune.report(scalars)


def trial_resources(config: dict[str, Any]) -> PlacementGroupFactory:
    """What RLlib asks for this trial's algorithm: the driver (with a local learner), every env
    runner and every remote learner, from the experiment's counts and resources."""
    from empg_rllib.algorithm.empg import EMPG, EMPGConfig

    algo_config = EMPGConfig().experiment_from(trial_experiment(config), config["trial"]["model_path"])
    return EMPG.default_resource_request(algo_config)


def trial_dirname(trial: Any) -> str:
    return trial.config["trial"]["name"]


def _trainable() -> Any:
    from ray import tune

    return tune.with_resources(run_trial, trial_resources)


#: Set while Tune runs a sweep, and why.
_TUNE_ENV = {
    # The metric was checked against every trial's experiment before Ray started; evaluation
    # results come every `evaluation.interval` iterations, which Tune's per-result check rejects.
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
    # Each trial writes TensorBoard logs into its run directory (training.train: scalars and
    # entropy histograms); Tune's own would show every trial twice. JSON and CSV are kept.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    # Trials keep the working directory of Ray's workers, as `empg train`'s actors do.
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
}


def _progress_callback(metric: str, iterations: dict[str, int]) -> Any:
    from ray.tune import Callback

    class TrialLines(Callback):
        """One line per trial result, end, restart and failure (Tune's status table would print
        each trial's whole experiment)."""

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            name = trial_dirname(trial)
            parts = [f"{name} iteration {int(result['training_iteration'])}/{iterations[name]}"]
            for label, key in (("train success", SUMMARY_KEYS["success"]), (metric, metric)):
                if isinstance(result.get(key), (int, float)):
                    parts.append(f"{label} {result[key]:.3g}")
            print("  ".join(parts), flush=True)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            name = trial_dirname(trial)
            done = int((trial.last_result or {}).get("training_iteration", 0))
            print(f"{name} ended at iteration {done}/{iterations[name]}", flush=True)

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            print(f"{trial_dirname(trial)} crashed; restarting it (from its last checkpoint, if any)", flush=True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            print(f"{trial_dirname(trial)} failed for good; the sweep goes on", flush=True)

    return TrialLines()


def model_paths(sweep: Sweep) -> dict[str, str]:
    """Each trial model's directory, resolved in the driver (`tiny:` built once) so that a
    missing model stops the sweep before any trial starts; trials on other nodes need it on
    shared storage."""
    from empg_rllib.workflows import models

    paths = {}
    for spec in dict.fromkeys(exp.model for exp in sweep.experiments):
        try:
            paths[spec] = str(models.resolve_model(spec).resolve())
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"model: {err}") from None
    return paths


def run(sweep: Sweep, resume: bool = False) -> Outcome:
    """Run (or with `resume`, continue) the sweep on the connected Ray cluster, then write the
    results CSV and the best trial's experiment YAML into the sweep directory."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler

    settings = sweep.settings
    with environ_set(_TUNE_ENV):
        if resume:
            tuner = tune.Tuner.restore(str(sweep.dir), trainable=_trainable(), resume_errored=True)
        else:
            paths = model_paths(sweep)
            sweep.dir.mkdir(parents=True, exist_ok=True)
            (sweep.dir / RESOLVED_FILE).write_text(yaml.safe_dump(_plain(sweep.resolved()), sort_keys=False))
            points = [
                {"name": t.name, "values": t.values, "model_path": paths[exp.model]}
                for t, exp in zip(sweep.trials, sweep.experiments)
            ]
            scheduler = None
            if settings.early_stopping:
                scheduler = ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=max(exp.iterations for exp in sweep.experiments),
                    grace_period=settings.early_stopping.grace_period,
                    reduction_factor=settings.early_stopping.reduction_factor,
                )
            iterations = {t.name: exp.iterations for t, exp in zip(sweep.trials, sweep.experiments)}
            tuner = tune.Tuner(
                _trainable(),
                # The trials were drawn and validated in `load`; Tune runs exactly those.
                param_space={"trial": tune.grid_search(points), "experiment": sweep.base, "run_dir": str(sweep.dir)},
                tune_config=tune.TuneConfig(
                    metric=settings.metric,
                    mode=settings.mode,
                    scheduler=scheduler,
                    max_concurrent_trials=settings.max_concurrent_trials,
                    trial_name_creator=trial_dirname,
                    trial_dirname_creator=trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=sweep.dir.name,
                    storage_path=str(sweep.dir.parent),
                    failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                    callbacks=[JsonLoggerCallback(), CSVLoggerCallback(), _progress_callback(settings.metric, iterations)],
                    verbose=0,
                ),
            )
        grid = tuner.fit()
    return write_outcome(sweep, grid)


def _status(result: Any, exp: Experiment) -> tuple[str, int]:
    metrics = (result.metrics if result is not None else None) or {}
    iteration = int(metrics.get("training_iteration", 0))
    if result is not None and result.error is not None:
        return "error", iteration
    if not metrics.get("done"):  # Tune marks a trial's last result done when it ends or is stopped
        return "unfinished", iteration
    return ("done" if iteration >= exp.iterations else "stopped early"), iteration


def write_outcome(sweep: Sweep, grid: ResultGrid) -> Outcome:
    """results.csv (one row per trial) and best.yaml, the best trial as an experiment file."""
    metric = sweep.settings.metric
    by_name = {result.config["trial"]["name"]: result for result in grid}
    rows = []
    for trial, exp in zip(sweep.trials, sweep.experiments):
        result = by_name.get(trial.name)
        metrics = (result.metrics if result else None) or {}
        status, iteration = _status(result, exp)
        error = str(result.error).strip().splitlines()[-1] if result and result.error else ""
        rows.append(
            {
                "trial": trial.name,
                "status": status,
                "iterations": f"{iteration}/{exp.iterations}",
                **trial.values,
                metric: metrics.get(metric),
                **{key: metrics.get(key) for key in SUMMARY_KEYS.values() if key != metric},
                "error": error,
            }
        )
    csv_path = sweep.dir / RESULTS_FILE
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    unfinished = sum(row["status"] == "unfinished" for row in rows)
    # An interrupted sweep has no best trial yet: an unfinished one may still overtake it.
    best = _best(sweep, grid) if not unfinished else None
    best_yaml = sweep.dir / BEST_FILE if best else None
    if best:
        write_best(sweep, *best, best_yaml)
    return Outcome(rows, unfinished, best, csv_path, best_yaml)


def _best(sweep: Sweep, grid: ResultGrid) -> tuple[Trial, float] | None:
    settings = sweep.settings
    try:
        # Each trial's last reported value: what ASHA compared, and a finished trial's final one.
        result = grid.get_best_result(settings.metric, settings.mode, scope="last")
    except RuntimeError:  # no trial reported the metric
        return None
    value = (result.metrics or {}).get(settings.metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    trial = next(t for t in sweep.trials if t.name == result.config["trial"]["name"])
    return trial, float(value)


def write_best(sweep: Sweep, trial: Trial, value: float, path: Path) -> None:
    """The best trial's experiment as a file `empg train` runs unchanged: the base experiment
    with the trial's values, named after the sweep; its run directory is the base's."""
    data = {"name": f"{sweep.name}-best", **{k: v for k, v in trial.experiment.items() if k != "name"}}
    validate(data)
    shown = ", ".join(f"{k}={v!r}" for k, v in trial.values.items())
    header = (
        f"# Best trial of sweep {sweep.name!r} ({sweep.path}): {trial.name} ({shown}),\n"
        f"# {sweep.settings.metric} = {value:.4g} (its last reported value; a tie goes to the first trial).\n"
        f"# Train it: empg train {path}\n"
    )
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))


def results_table(sweep: Sweep, rows: list[dict[str, Any]]) -> Any:
    """A rich table of the trials: status, searched values, the metric and training success;
    the errors' last lines when a trial failed (results.csv has every summary metric)."""
    from rich.table import Table

    metric = sweep.settings.metric
    table = Table(title=f"sweep {sweep.name}: {metric} ({sweep.settings.mode})")
    # Short headers keep the table readable in an 80-column terminal.
    columns = {"trial": "trial", "status": "status", "iterations": "iter"}
    columns.update({key: key for key in sweep.settings.search_space})
    columns[metric] = metric.removeprefix(f"{metrics.EVALUATION}/").replace("/", " ")
    columns[SUMMARY_KEYS["success"]] = "train success"
    if any(row["error"] for row in rows):
        columns["error"] = "error"
    for header in columns.values():
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*(value_cell(row[key]) for key in columns))
    return table


def clear_dir(sweep: Sweep) -> None:
    """Delete an earlier sweep's directory (`--overwrite`)."""
    shutil.rmtree(sweep.dir, ignore_errors=True)
