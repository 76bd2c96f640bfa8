"""Reading training runs from their own logs: a run is a directory `train` wrote
(`run_dir/<name>/`, or a sweep's `trial_NNN/`), read from its TensorBoard events, or from
`history.json` where there are none (fewer metrics: no env steps, wall time, evaluation or
entropy percentiles). Its name, seed and algorithm come from the `experiment.yaml` of its latest
checkpoint, else the directory's name. Runs that share a name, an algorithm and nothing else but
the seed are one group.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from empg_rllib.core import metrics
from empg_rllib.core.metrics import SUMMARY_KEYS
from empg_rllib.workflows.runs import CHECKPOINT_PREFIX, RAY_LOGS

# TensorBoard tags `train` writes (training.flatten of each iteration's result).
ENV_STEPS = metrics.NUM_ENV_STEPS_SAMPLED_LIFETIME
_ENV_STEPS_ALTERNATIVE = metrics.env_runners(metrics.NUM_ENV_STEPS_SAMPLED_LIFETIME)
WALL_TIME = metrics.TIME_TOTAL_S
SUCCESS = metrics.env_runners(metrics.SUCCESS_RATE)
SUCCESS_BY_TYPE = metrics.env_runners(metrics.SUCCESS_RATE_BY_TYPE) + "/"
_EVAL_SUCCESS = re.compile(rf"^{metrics.EVALUATION}/(?P<split>[^/]+)/{metrics.SUCCESS_RATE}$")
ENTROPY_PERCENTILES = tuple(metrics.step_entropy_percentile(q) for q in metrics.STEP_ENTROPY_PERCENTILES)
ENTROPY_SUCCESS, ENTROPY_FAILURE = (metrics.step_entropy_mean_of(outcome) for outcome in metrics.OUTCOMES)
CONFIDENT_ERRORS = metrics.CONFIDENT_ERROR_SHARE
HISTOGRAM = metrics.STEP_ENTROPY_HISTOGRAM


class ReportError(ValueError):
    """A run directory that cannot be read, or nothing to report; raised before any plotting."""


@dataclass
class Run:
    path: Path
    name: str
    seed: int | None
    algorithm: str
    source: str  # "tensorboard" or "history.json"
    scalars: dict[str, dict[int, float]]  # tag -> {training iteration: value}
    histograms: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # iteration -> (edges, counts)

    def at(self, tag: str, iteration: int) -> float | None:
        return self.scalars.get(tag, {}).get(iteration)

    def last(self, tag: str) -> float | None:
        series = self.scalars.get(tag)
        return series[max(series)] if series else None

    def has(self, tag: str) -> bool:
        return bool(self.scalars.get(tag))

    @property
    def iterations(self) -> int:
        return max((max(s) for s in self.scalars.values() if s), default=0)

    def eval_splits(self) -> list[str]:
        return [m["split"] for tag in self.scalars if (m := _EVAL_SUCCESS.match(tag)) and self.scalars[tag]]

    def task_types(self) -> list[str]:
        return [tag[len(SUCCESS_BY_TYPE):] for tag in self.scalars if tag.startswith(SUCCESS_BY_TYPE)]


@dataclass
class Group:
    label: str
    runs: list[Run]

    @property
    def algorithm(self) -> str:
        return self.runs[0].algorithm

    def legend(self) -> str:
        seeds = f", {len(self.runs)} seeds" if len(self.runs) > 1 else ""
        return f"{self.label} ({self.algorithm}{seeds})"


def _is_run(directory: Path) -> bool:
    return (directory / "history.json").is_file() or any((directory / "tensorboard").glob("events.out.tfevents.*"))


def _runs_under(directory: Path) -> list[Path]:
    if _is_run(directory):
        return [directory]
    found = []
    for child in sorted(directory.iterdir()):
        # A run's own outputs hold no runs; Ray's logs folders are large.
        if child.is_dir() and not child.name.startswith((CHECKPOINT_PREFIX, RAY_LOGS, ".")):
            found.extend(_runs_under(child))
    return found


def find_runs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The run directories of `paths`: each a run, or a directory with runs below it (a sweep,
    a whole `runs/`). A path that is neither raises ReportError naming it."""
    if not paths:
        raise ReportError("no run directory given")
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise ReportError(f"{given}: no such directory")
        if not path.is_dir():
            raise ReportError(f"{given}: not a directory (give a run directory: run_dir/<name>)")
        runs = _runs_under(path)
        if not runs:
            raise ReportError(f"{given}: no run in it (no tensorboard/ events or history.json in it or below it)")
        found.extend(r for r in map(Path.resolve, runs) if r not in found)
    return found


def _experiment_of(run: Path) -> dict[str, Any]:
    """The experiment as saved with the run's latest checkpoint; {} when it has none."""
    saved = sorted(run.glob(f"{CHECKPOINT_PREFIX}*/experiment.yaml"))
    return (yaml.safe_load(saved[-1].read_text()) or {}) if saved else {}


def algorithm_label(exp: dict[str, Any]) -> str:
    """'DAPO + EMPG', 'GRPO', 'DAPO + EMPG (no bonus)'...; '?' without a saved experiment.
    Missing keys take Experiment's defaults."""
    if not exp:
        return "?"
    label = str(exp.get("loss", "grpo")).upper()
    empg = exp.get("empg") or {}
    if empg.get("enabled", True):
        label += " + EMPG"
        ablated = [part for part in ("scaling", "bonus") if not empg.get(f"use_{part}", True)]
        if ablated:
            label += f" (no {' or '.join(ablated)})"
    return label


def _read_tensorboard(directory: Path) -> tuple[dict[str, dict[int, float]], dict[int, tuple[np.ndarray, np.ndarray]]]:
    from tensorboard.backend.event_processing import event_accumulator as ea

    # 0: keep every event (the default keeps a sample of 1000 scalars and 1 histogram per tag).
    acc = ea.EventAccumulator(str(directory), size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0})
    acc.Reload()
    tags = acc.Tags()
    # A dict per tag: a resumed run's re-logged iteration keeps its latest value.
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in tags.get(ea.SCALARS, [])}
    histograms = {}
    if HISTOGRAM in tags.get(ea.HISTOGRAMS, []):
        for event in acc.Histograms(HISTOGRAM):
            histograms[event.step] = _histogram_bins(event.histogram_value)
    return scalars, histograms


def _histogram_bins(h: Any) -> tuple[np.ndarray, np.ndarray]:
    """(edges, counts) of a TensorBoard histogram: bucket i holds the values up to bucket_limit[i]
    above bucket_limit[i - 1]; the first bucket starts at the histogram's minimum."""
    limits = np.asarray(h.bucket_limit, dtype=float)
    counts = np.asarray(h.bucket, dtype=float)
    edges = np.concatenate([[min(h.min, limits[0])], limits])
    if edges[1] <= edges[0]:  # torch's SummaryWriter starts with an empty bucket of no width
        edges, counts = edges[1:], counts[1:]
    return edges, counts


def _read_history(path: Path) -> dict[str, dict[int, float]]:
    try:
        history = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON ({err})") from None
    scalars: dict[str, dict[int, float]] = {}
    for entry in history:
        for label, tag in SUMMARY_KEYS.items():
            if entry.get(label) is not None:
                scalars.setdefault(tag, {})[int(entry["iteration"])] = float(entry[label])
    return scalars


def load_run(path: str | os.PathLike) -> Run:
    """One run directory: its TensorBoard events, else its history.json."""
    path = Path(path)
    histograms: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if any((path / "tensorboard").glob("events.out.tfevents.*")):
        scalars, histograms = _read_tensorboard(path / "tensorboard")
        source = "tensorboard"
    elif (path / "history.json").is_file():
        scalars, source = _read_history(path / "history.json"), "history.json"
    else:
        raise ReportError(f"{path}: no tensorboard/ events and no history.json")
    if ENV_STEPS not in scalars and _ENV_STEPS_ALTERNATIVE in scalars:
        scalars[ENV_STEPS] = scalars[_ENV_STEPS_ALTERNATIVE]
    if not any(scalars.values()):
        raise ReportError(f"{path}: its {source} holds no metrics (did its first iteration finish?)")
    exp = _experiment_of(path)
    seed = exp.get("seed")
    return Run(path, str(exp.get("name") or path.name), None if seed is None else int(seed),
               algorithm_label(exp), source, scalars, histograms)


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs of one name, one algorithm and distinct known seeds are one group, in order of first
    appearance. Runs that share a name but not that (two sweeps' `trial_000`, both seed 0) are
    different experiments: each is its own group, labelled by its directory."""
    by_name: dict[str, list[Run]] = {}
    for run in runs:
        by_name.setdefault(run.name, []).append(run)
    common = Path(os.path.commonpath([r.path for r in runs])) if runs else Path()
    groups = []
    for name, members in by_name.items():
        seeds = [r.seed for r in members]
        if len(members) == 1 or (None not in seeds and len(set(seeds)) == len(seeds)
                                 and len({r.algorithm for r in members}) == 1):
            groups.append(Group(name, members))
        else:
            groups.extend(Group(str(r.path.relative_to(common)), [r]) for r in members)
    return groups


