"""`empg report`: figures and a markdown table comparing training runs, from the runs' own logs.

A run is a directory `train` wrote (`run_dir/<name>/`, or a sweep's `trial_NNN/`): its
TensorBoard events, or `history.json` where there are none (fewer metrics: no env steps, wall
time, evaluation or entropy percentiles). Its name, seed and algorithm come from the
`experiment.yaml` of its latest checkpoint, else the directory's name. Runs that share a name,
an algorithm and nothing else but the seed are one group: curves show the mean over seeds, a
band the lowest and highest over seeds, and the table mean ± sample standard deviation.

Every figure is drawn on the x-axis where its metric lives: training success against env steps,
wall-clock time and iterations; per-update diagnostics (step entropy, EMPG's g and f) against
the training iteration. A figure no run has data for is not written; report.md says why.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import yaml

from empg_rllib.training import CHECKPOINT_PREFIX, RAY_LOGS, SUMMARY_KEYS

# TensorBoard tags `train` writes (training.flatten of each iteration's result).
ENV_STEPS = "num_env_steps_sampled_lifetime"
_ENV_STEPS_ALTERNATIVE = "env_runners/num_env_steps_sampled_lifetime"
WALL_TIME = "time_total_s"
SUCCESS = SUMMARY_KEYS["success"]
STEP_ENTROPY_MEAN = SUMMARY_KEYS["H_step"]
SUCCESS_BY_TYPE = "env_runners/success_rate_by_type/"
_EVAL_SUCCESS = re.compile(r"^evaluation/(?P<split>[^/]+)/success_rate$")
ENTROPY_PERCENTILES = ("step_entropy_p10", "step_entropy_p50", "step_entropy_p90")
ENTROPY_SUCCESS, ENTROPY_FAILURE = "step_entropy_mean_success", "step_entropy_mean_failure"
CONFIDENT_ERRORS = "confident_error_share"
HISTOGRAM = "step_entropy"

FIGURES = {
    "learning_curves": "Learning curves",
    "success_by_task_type": "Success per task type",
    "step_entropy": "Step entropy over training",
    "entropy_vs_outcome": "Step entropy vs outcome",
    "empg_terms": "EMPG's g and f",
}
#: Runs whose distribution of step entropies is drawn (one panel each).
MAX_DISTRIBUTION_PANELS = 4
#: Snapshots (iterations) drawn per distribution panel.
DISTRIBUTION_SNAPSHOTS = 4


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


# ---- finding and reading runs -----------------------------------------------------------------
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


# ---- statistics -------------------------------------------------------------------------------
@dataclass
class Curve:
    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def curve(
    runs: Sequence[Run], tag: str, x_tag: str | None = None, low_tag: str | None = None, high_tag: str | None = None
) -> Curve | None:
    """Per training iteration: the mean of `tag` over the runs that logged it (and `x_tag`), and
    a band from the lowest `low_tag` to the highest `high_tag` over them (default: `tag`); x is
    the iteration, or the mean of `x_tag`. None when no run has a point."""
    points = []
    for iteration in sorted({i for r in runs for i in r.scalars.get(tag, {})}):
        having = [r for r in runs if r.at(tag, iteration) is not None
                  and (x_tag is None or r.at(x_tag, iteration) is not None)]
        if not having:
            continue
        xs = [iteration] if x_tag is None else [r.at(x_tag, iteration) for r in having]
        ys = [r.at(tag, iteration) for r in having]
        lows = [v for r in having if (v := r.at(low_tag or tag, iteration)) is not None] or ys
        highs = [v for r in having if (v := r.at(high_tag or tag, iteration)) is not None] or ys
        points.append((np.mean(xs), np.mean(ys), min(lows), max(highs)))
    if not points:
        return None
    x, mean, low, high = (np.asarray(column, dtype=float) for column in zip(*points))
    return Curve(x, mean, low, high)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def success_gain(before: dict[str, float], after: dict[str, float]) -> tuple[float, float | None]:
    """The change in success rate from `before` to `after` (evaluation results with
    `success_rate` and `episodes`) and its binomial standard error, the two rates counted as
    independent samples: sqrt(p1 (1 - p1) / n1 + p2 (1 - p2) / n2); None without episodes."""
    p1, n1 = before["success_rate"], before["episodes"]
    p2, n2 = after["success_rate"], after["episodes"]
    if not n1 or not n2:
        return p2 - p1, None
    return p2 - p1, math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)


def _late_mean(run: Run, tag: str) -> float | None:
    """Mean of `tag` over the run's last quarter of iterations (at least one): a per-type rate
    from a handful of episodes per batch is too noisy to read at a single iteration."""
    series = run.scalars.get(tag)
    if not series:
        return None
    iterations = sorted(series)
    late = iterations[-max(1, math.ceil(len(iterations) / 4)):]
    return statistics.fmean(series[i] for i in late)


# ---- figures ----------------------------------------------------------------------------------
BAND_NOTE = "line: mean over seeds; shaded: lowest to highest over seeds"


def _figure(panels: int, width: float | None = None, height: float = 4.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = panels if panels <= 3 else 2
    rows = math.ceil(panels / cols)
    # The Agg canvas directly: no pyplot, so no global backend is switched in the caller's process.
    fig = Figure(figsize=(width or max(6.4 * cols, 9.0), height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for extra in axes[panels:]:
        extra.remove()
    return fig, list(axes[:panels])


def _draw(ax: Any, c: Curve, color: Any, label: str, band: bool, x_scale: float = 1.0,
          y_scale: float = 1.0, linestyle: str = "-") -> None:
    # Markers: a curve of a few points (evaluation every N iterations) must still be visible.
    marker = "o" if len(c.x) <= 30 else None
    ax.plot(c.x * x_scale, c.mean * y_scale, color=color, linestyle=linestyle, marker=marker,
            markersize=3.5, label=label)
    if band and np.any(c.high > c.low):
        ax.fill_between(c.x * x_scale, c.low * y_scale, c.high * y_scale, color=color, alpha=0.18, linewidth=0)


def _label(ax: Any, title: str, xlabel: str, ylabel: str, percent: bool = False) -> None:
    ax.set_title(textwrap.fill(title, 60))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if percent:
        ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


@dataclass
class Panel:
    """One axis: its titles and what to draw on it, run only once the layout is known."""

    title: str
    xlabel: str
    ylabel: str
    draw: Callable[[Any], None]
    percent: bool = False


def _save(panels: list[Panel], title: str, path: Path, width: float | None = None) -> None:
    fig, axes = _figure(len(panels), width)
    for ax, panel in zip(axes, panels):
        panel.draw(ax)
        _label(ax, panel.title, panel.xlabel, panel.ylabel, panel.percent)
    # About 8 characters of an x-large title per inch of figure.
    fig.suptitle(textwrap.fill(title, int(fig.get_figwidth() * 8)), fontsize="x-large")
    fig.savefig(path, dpi=110)


class _Report:
    """The figures of one report: each method writes its PNG and returns a note for report.md
    ('' when all is drawn), or returns None when no run has its data."""

    def __init__(self, groups: list[Group], out: Path) -> None:
        import matplotlib

        self.groups = groups
        self.out = out
        palette = matplotlib.colormaps["tab10"].colors
        self.color = {g.label: palette[i % len(palette)] for i, g in enumerate(groups)}

    def _series_panel(self, tag: str, x_tag: str | None, x_scale: float = 1.0, y_scale: float = 1.0,
                      low_tag: str | None = None, high_tag: str | None = None) -> Callable[[Any], None] | None:
        """Each group's curve of `tag`; None when no group has one."""
        curves = [(g, c) for g in self.groups if (c := curve(g.runs, tag, x_tag, low_tag, high_tag))]
        if not curves:
            return None

        def draw(ax: Any) -> None:
            for g, c in curves:
                band = len(g.runs) > 1 or low_tag is not None
                _draw(ax, c, self.color[g.label], g.legend(), band, x_scale, y_scale)

        return draw

    def learning_curves(self) -> str | None:
        panels = []
        partial = [r.path.name for g in self.groups for r in g.runs if r.has(SUCCESS) and not r.has(ENV_STEPS)]
        axes = [
            (ENV_STEPS, 1.0, "env steps sampled (agent turns)", "env steps"),
            (WALL_TIME, 1 / 60, "wall-clock time (minutes)", "wall-clock time"),
        ]
        if partial:  # history.json runs: all runs against the one axis they share
            axes.append((None, 1.0, "training iteration", "iteration"))
        for x_tag, x_scale, xlabel, short in axes:
            draw = self._series_panel(SUCCESS, x_tag, x_scale, 100.0)
            if draw:
                panels.append(Panel(f"Training success vs {short}", xlabel, "training success rate (%)", draw, True))
        splits = sorted({s for g in self.groups for r in g.runs for s in r.eval_splits()})
        evaluated = [(g, s, c) for g in self.groups for s in splits
                     if (c := curve(g.runs, f"evaluation/{s}/success_rate", ENV_STEPS))]
        if evaluated:
            styles = dict(zip(splits, ["-", "--", ":", "-."] * len(splits)))

            def draw_eval(ax: Any) -> None:
                for g, split, c in evaluated:
                    _draw(ax, c, self.color[g.label], f"{g.legend()}: {split}", len(g.runs) > 1, y_scale=100.0,
                          linestyle=styles[split])

            panels.append(Panel("Evaluation success per split", "env steps sampled (agent turns)",
                                "evaluation success rate (%)", draw_eval, True))
        if not panels:
            return None
        _save(panels, f"Learning curves ({BAND_NOTE})", self.out / "learning_curves.png")
        note = "" if evaluated else "No run logged an evaluation. "
        if partial:
            note += (f"Only in the iteration panel: {', '.join(partial)} (history.json records neither env "
                     "steps nor wall time).")
        return note.strip()

    def success_by_task_type(self) -> str | None:
        types = sorted({t for g in self.groups for r in g.runs for t in r.task_types()})
        if not types:
            return None
        bars = []  # (group, per-type (mean, std) or None)
        for g in self.groups:
            row = []
            for task_type in types:
                values = [v for r in g.runs if (v := _late_mean(r, SUCCESS_BY_TYPE + task_type)) is not None]
                row.append(mean_std(values) if values else None)
            if any(row):
                bars.append((g, row))

        def draw(ax: Any) -> None:
            width = 0.8 / len(bars)
            for k, (g, row) in enumerate(bars):
                xs = [i - 0.4 + width * (k + 0.5) for i, v in enumerate(row) if v]
                means = [100 * v[0] for v in row if v]
                errors = [100 * (v[1] or 0.0) for v in row if v]
                drawn = ax.bar(xs, means, width, yerr=errors if len(g.runs) > 1 else None, capsize=3,
                               color=self.color[g.label], label=g.legend())
                # The value on each bar: a 0% bar is otherwise invisible, as is a missing one. In
                # the bar, where no error bar covers it.
                ax.bar_label(drawn, fmt="%.0f%%", fontsize="small", label_type="center")
            ax.set_xticks(range(len(types)), [t.replace("_", " ") for t in types], rotation=15, ha="right")

        panel = Panel("Training success per task type, mean over each run's last quarter of iterations",
                      "task type", "training success rate (%)", draw, True)
        fig_title = "Success per task type (bar: mean over seeds; error bar: sample standard deviation over seeds)"
        width = max(9.0, 0.45 * len(types) * len(bars) + 3)
        _save([panel], fig_title, self.out / "success_by_task_type.png", width)
        return ""

    def step_entropy(self) -> str | None:
        p10, p50, p90 = ENTROPY_PERCENTILES
        panels = []
        draw = self._series_panel(p50, None, low_tag=p10, high_tag=p90)
        if draw:
            panels.append(Panel("Step entropy percentiles (line: median; shaded: p10 to p90)",
                                "training iteration", "step entropy (nats)", draw))
        with_histograms = [g for g in self.groups if any(r.histograms for r in g.runs)]
        for g in with_histograms[:MAX_DISTRIBUTION_PANELS]:
            run = next(r for r in g.runs if r.histograms)
            panels.append(Panel(f"Cumulative distribution of step entropies: {g.label}"
                                + (f" (seed {run.seed})" if len(g.runs) > 1 else ""),
                                "step entropy (nats)", "steps at or below this entropy (%)",
                                self._distribution(run), True))
        if not panels:
            return None
        _save(panels, "Step entropy over training (per step: mean entropy of its tokens)", self.out / "step_entropy.png")
        notes = []
        if not draw:
            notes.append("No run logged step-entropy percentiles.")
        if not with_histograms:
            notes.append("No run logged a step-entropy histogram.")
        elif len(with_histograms) > MAX_DISTRIBUTION_PANELS:
            shown = ", ".join(g.label for g in with_histograms[:MAX_DISTRIBUTION_PANELS])
            notes.append(f"Distributions drawn for the first {MAX_DISTRIBUTION_PANELS} groups only: {shown}.")
        return " ".join(notes)

    @staticmethod
    def _distribution(run: Run) -> Callable[[Any], None]:
        """A few iterations' distributions from first to last, darker to lighter. Cumulative: the
        logged buckets are exponentially narrower near 0, where a density would spike."""
        import matplotlib

        iterations = sorted(run.histograms)
        picks = sorted({iterations[round(i)] for i in np.linspace(0, len(iterations) - 1, DISTRIBUTION_SNAPSHOTS)})
        colors = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, len(picks)))

        def draw(ax: Any) -> None:
            for color, iteration in zip(colors, picks):
                edges, counts = run.histograms[iteration]
                below = np.concatenate([[0.0], np.cumsum(counts)]) / max(counts.sum(), 1.0)
                ax.plot(edges, 100 * below, color=color, label=f"iteration {iteration}")

        return draw

    def entropy_vs_outcome(self) -> str | None:
        panels = []
        outcome = [g for g in self.groups if any(r.has(ENTROPY_SUCCESS) or r.has(ENTROPY_FAILURE) for r in g.runs)]
        if outcome:
            def draw_outcome(ax: Any) -> None:
                for g in outcome:
                    for tag, style, word in ((ENTROPY_SUCCESS, "-", "successful"), (ENTROPY_FAILURE, "--", "failed")):
                        if c := curve(g.runs, tag):
                            _draw(ax, c, self.color[g.label], f"{g.legend()}: {word}", len(g.runs) > 1,
                                  linestyle=style)

            panels.append(Panel("Mean step entropy of successful (solid) vs failed (dashed) trajectories",
                                "training iteration", "mean step entropy (nats)", draw_outcome))
        draw = self._series_panel(CONFIDENT_ERRORS, None, y_scale=100.0)
        if draw:
            panels.append(Panel("Confident errors: steps below the batch's median entropy in trajectories "
                                "with a negative advantage",
                                "training iteration", "share of the batch's steps (%)", draw))
        if not panels:
            return None
        _save(panels, f"Step entropy vs outcome ({BAND_NOTE})", self.out / "entropy_vs_outcome.png")
        if not outcome:
            return (f"No run logged {ENTROPY_SUCCESS} / {ENTROPY_FAILURE} (runs from before these metrics): "
                    "the confident-error share only.")
        return "" if draw else "No run logged the confident-error share."

    def empg_terms(self) -> str | None:
        panels = []
        for name, what in (("g", "self-calibrating scale of each step's advantage"),
                           ("f", "future-clarity bonus of each step with a next step")):
            draw = self._series_panel(f"empg_{name}_mean", None, low_tag=f"empg_{name}_min", high_tag=f"empg_{name}_max")
            if draw:
                panels.append(Panel(f"EMPG {name}: {what}\n(line: batch mean; shaded: batch min to max)",
                                    "training iteration", f"{name} (dimensionless)", draw))
        if not panels:
            return None
        _save(panels, "EMPG's g and f over training (mean over seeds)", self.out / "empg_terms.png")
        without = [g.label for g in self.groups if not any(r.has("empg_g_mean") for r in g.runs)]
        return f"Not in it (no EMPG terms logged): {', '.join(without)}." if without else ""


_NO_DATA = {
    "learning_curves": "no run logged a training success rate",
    "success_by_task_type": f"no run logged a success rate per task type ({SUCCESS_BY_TYPE}<type>)",
    "step_entropy": "no run logged step-entropy percentiles or a step-entropy histogram (TensorBoard only)",
    "entropy_vs_outcome": "no run logged the step entropy of successful / failed trajectories or the "
    "confident-error share (TensorBoard only)",
    "empg_terms": "no run logged EMPG's g and f (runs without EMPG, or history.json only)",
}


# ---- the table --------------------------------------------------------------------------------
def _fmt(values: Sequence[float], total: int, percent: bool = False, digits: int = 1) -> str:
    """'37.5% ± 8.8%' over the runs that have the value; '(n of N)' when some do not."""
    if not values:
        return "—"
    mean, std = mean_std(values)
    scale, unit = (100.0, "%") if percent else (1.0, "")
    text = f"{mean * scale:,.{digits}f}{unit}" + ("" if std is None else f" ± {std * scale:,.{digits}f}{unit}")
    return text + (f" ({len(values)} of {total})" if len(values) < total else "")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def table(groups: Sequence[Group]) -> str:
    """The markdown table comparing the groups: one row per group."""
    splits = sorted({s for g in groups for r in g.runs for s in r.eval_splits()})
    header = ["run", "algorithm", "seeds", "iterations", "env steps", "final training success",
              *[f"final eval success: {s}" for s in splits], "wall time (min)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        n = len(g.runs)
        iterations = sorted({r.iterations for r in g.runs})
        row = [
            g.label,
            g.algorithm,
            ", ".join("?" if r.seed is None else str(r.seed) for r in g.runs),
            str(iterations[0]) if len(iterations) == 1 else f"{iterations[0]}–{iterations[-1]}",
            _fmt([v for r in g.runs if (v := r.last(ENV_STEPS)) is not None], n, digits=0),
            _fmt([v for r in g.runs if (v := r.last(SUCCESS)) is not None], n, percent=True),
            *[_fmt([v for r in g.runs if (v := r.last(f"evaluation/{s}/success_rate")) is not None], n, percent=True)
              for s in splits],
            _fmt([v / 60 for r in g.runs if (v := r.last(WALL_TIME)) is not None], n),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines)


def _runs_table(groups: Sequence[Group]) -> str:
    lines = ["| directory | group | seed | read from | iterations |", "|---|---|---|---|---|"]
    for g in groups:
        for r in g.runs:
            seed = "?" if r.seed is None else r.seed
            lines.append(f"| {_cell(r.path)} | {_cell(g.label)} | {seed} | {r.source} | {r.iterations} |")
    return "\n".join(lines)


def write_report(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Read every run of `paths` (ReportError naming a bad one, before any plotting), write the
    figures and report.md into `out`; returns report.md's path."""
    groups = group_runs([load_run(p) for p in find_runs(paths)])
    if importlib.util.find_spec("matplotlib") is None:
        raise ReportError("empg report draws with matplotlib: pip install matplotlib (or the project's `bench` extra)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = _Report(groups, out)
    sections = []
    for name, title in FIGURES.items():
        note = getattr(figures, name)()
        png = out / f"{name}.png"
        if note is None:
            # An earlier report's figure in the same folder would otherwise pass for this one's.
            png.unlink(missing_ok=True)
            sections.append(f"### {title}\n\nSkipped: {_NO_DATA[name]}.")
        else:
            sections.append(f"### {title}\n\n![{title}]({png.name})" + (f"\n\n{note}" if note else ""))
    text = "\n\n".join([
        "# Training report",
        f"{sum(len(g.runs) for g in groups)} run(s) in {len(groups)} group(s). Runs that share an experiment "
        "name and algorithm and differ in seed form one group: values are the mean ± sample standard deviation "
        "over its seeds; \"final\" is each run's last logged value.",
        table(groups),
        "## Figures",
        *sections,
        "## Runs",
        _runs_table(groups),
    ])
    report = out / "report.md"
    report.write_text(text + "\n")
    return report
