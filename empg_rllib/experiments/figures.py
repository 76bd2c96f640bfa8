"""The report's figures, drawn with matplotlib's Agg canvas (no pyplot): each method of
`Figures` writes one PNG and returns a note for report.md, or None when no run has its data."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from empg_rllib.core import metrics
from empg_rllib.core.statistics import mean_std
from empg_rllib.experiments.run_logs import (
    CONFIDENT_ERRORS,
    ENTROPY_FAILURE,
    ENTROPY_PERCENTILES,
    ENTROPY_SUCCESS,
    ENV_STEPS,
    SUCCESS,
    SUCCESS_BY_TYPE,
    WALL_TIME,
    Group,
    Run,
)
from empg_rllib.experiments.stats import Curve, curve, late_mean

#: Runs whose distribution of step entropies is drawn (one panel each).
MAX_DISTRIBUTION_PANELS = 4
#: Snapshots (iterations) drawn per distribution panel.
DISTRIBUTION_SNAPSHOTS = 4


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


def plot_cumulative(ax: Any, edges: np.ndarray, counts: np.ndarray, **style: Any) -> None:
    """The cumulative distribution of histogram `counts` over bucket `edges`, in percent: step
    entropies crowd near 0, where a density would spike."""
    below = np.concatenate([[0.0], np.cumsum(counts)]) / max(float(np.sum(counts)), 1.0)
    ax.plot(edges, 100 * below, **style)


@dataclass
class Panel:
    """One axis: its titles and what to draw on it, run only once the layout is known."""

    title: str
    xlabel: str
    ylabel: str
    draw: Callable[[Any], None]
    percent: bool = False


def save_panels(panels: list[Panel], title: str, path: Path, width: float | None = None) -> None:
    fig, axes = _figure(len(panels), width)
    for ax, panel in zip(axes, panels):
        panel.draw(ax)
        _label(ax, panel.title, panel.xlabel, panel.ylabel, panel.percent)
    # About 8 characters of an x-large title per inch of figure.
    fig.suptitle(textwrap.fill(title, int(fig.get_figwidth() * 8)), fontsize="x-large")
    fig.savefig(path, dpi=110)


class Figures:
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
                     if (c := curve(g.runs, metrics.evaluation(s, metrics.SUCCESS_RATE), ENV_STEPS))]
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
        save_panels(panels, f"Learning curves ({BAND_NOTE})", self.out / "learning_curves.png")
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
                values = [v for r in g.runs if (v := late_mean(r, SUCCESS_BY_TYPE + task_type)) is not None]
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
        save_panels([panel], fig_title, self.out / "success_by_task_type.png", width)
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
        save_panels(panels, "Step entropy over training (per step: mean entropy of its tokens)", self.out / "step_entropy.png")
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
                plot_cumulative(ax, edges, counts, color=color, label=f"iteration {iteration}")

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
        save_panels(panels, f"Step entropy vs outcome ({BAND_NOTE})", self.out / "entropy_vs_outcome.png")
        if not outcome:
            return (f"No run logged {ENTROPY_SUCCESS} / {ENTROPY_FAILURE} (runs from before these metrics): "
                    "the confident-error share only.")
        return "" if draw else "No run logged the confident-error share."

    def empg_terms(self) -> str | None:
        panels = []
        for name, what in (("g", "self-calibrating scale of each step's advantage"),
                           ("f", "future-clarity bonus of each step with a next step")):
            draw = self._series_panel(metrics.empg_term(name, "mean"), None, low_tag=metrics.empg_term(name, "min"),
                                      high_tag=metrics.empg_term(name, "max"))
            if draw:
                panels.append(Panel(f"EMPG {name}: {what}\n(line: batch mean; shaded: batch min to max)",
                                    "training iteration", f"{name} (dimensionless)", draw))
        if not panels:
            return None
        save_panels(panels, "EMPG's g and f over training (mean over seeds)", self.out / "empg_terms.png")
        without = [g.label for g in self.groups if not any(r.has(metrics.empg_term("g", "mean")) for r in g.runs)]
        return f"Not in it (no EMPG terms logged): {', '.join(without)}." if without else ""


