"""`empg report`: figures and a markdown table comparing training runs, from the runs' own logs.

Runs are read by `run_logs` (a group: runs of one name and algorithm that differ only in seed);
curves show the mean over seeds, a band the lowest and highest over seeds, and the table
mean ± sample standard deviation (`stats`, `tables`). Every figure is drawn on the x-axis where
its metric lives: training success against env steps, wall-clock time and iterations;
per-update diagnostics (step entropy, EMPG's g and f) against the training iteration. A figure
no run has data for is not written; report.md says why (`figures`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

from empg_rllib.experiments.figures import Figures
from empg_rllib.experiments.run_logs import (
    SUCCESS_BY_TYPE,
    ReportError,
    find_runs,
    group_runs,
    load_run,
)
from empg_rllib.experiments.tables import runs_table, table

FIGURES = {
    "learning_curves": "Learning curves",
    "success_by_task_type": "Success per task type",
    "step_entropy": "Step entropy over training",
    "entropy_vs_outcome": "Step entropy vs outcome",
    "empg_terms": "EMPG's g and f",
}
_NO_DATA = {
    "learning_curves": "no run logged a training success rate",
    "success_by_task_type": f"no run logged a success rate per task type ({SUCCESS_BY_TYPE}<type>)",
    "step_entropy": "no run logged step-entropy percentiles or a step-entropy histogram (TensorBoard only)",
    "entropy_vs_outcome": "no run logged the step entropy of successful / failed trajectories or the "
    "confident-error share (TensorBoard only)",
    "empg_terms": "no run logged EMPG's g and f (runs without EMPG, or history.json only)",
}


def write_report(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Read every run of `paths` (ReportError naming a bad one, before any plotting), write the
    figures and report.md into `out`; returns report.md's path."""
    groups = group_runs([load_run(p) for p in find_runs(paths)])
    if importlib.util.find_spec("matplotlib") is None:
        raise ReportError("empg report draws with matplotlib: pip install matplotlib (or the project's `bench` extra)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = Figures(groups, out)
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
        runs_table(groups),
    ])
    report = out / "report.md"
    report.write_text(text + "\n")
    return report
