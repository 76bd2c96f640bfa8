"""Markdown tables of results, and the one formatter of each kind of cell they use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from empg_rllib.core import metrics
from empg_rllib.core.statistics import mean_std
from empg_rllib.experiments.run_logs import ENV_STEPS, SUCCESS, WALL_TIME, Group


def mean_std_cell(values: Sequence[float], total: int | None = None, percent: bool = False, digits: int = 1) -> str:
    """'37.5% ± 8.8%': mean ± sample std of `values` ('—' without any); '(n of N)' when only
    some of `total` runs have the value."""
    if not values:
        return "—"
    mean, std = mean_std(values)
    scale, unit = (100.0, "%") if percent else (1.0, "")
    text = f"{mean * scale:,.{digits}f}{unit}" + ("" if std is None else f" ± {std * scale:,.{digits}f}{unit}")
    return text + (f" ({len(values)} of {total})" if total is not None and len(values) < total else "")


def value_cell(value: Any) -> str:
    """One value: '-' for none, 3 significant digits for a float."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def markdown_cell(text: Any) -> str:
    """`text` safe inside a markdown table cell."""
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
            mean_std_cell([v for r in g.runs if (v := r.last(ENV_STEPS)) is not None], n, digits=0),
            mean_std_cell([v for r in g.runs if (v := r.last(SUCCESS)) is not None], n, percent=True),
            *[mean_std_cell([v for r in g.runs if (v := r.last(metrics.evaluation(s, metrics.SUCCESS_RATE))) is not None], n, percent=True)
              for s in splits],
            mean_std_cell([v / 60 for r in g.runs if (v := r.last(WALL_TIME)) is not None], n),
        ]
        lines.append("| " + " | ".join(markdown_cell(c) for c in row) + " |")
    return "\n".join(lines)


def runs_table(groups: Sequence[Group]) -> str:
    lines = ["| directory | group | seed | read from | iterations |", "|---|---|---|---|---|"]
    for g in groups:
        for r in g.runs:
            seed = "?" if r.seed is None else r.seed
            lines.append(f"| {markdown_cell(r.path)} | {markdown_cell(g.label)} | {seed} | {r.source} | {r.iterations} |")
    return "\n".join(lines)


