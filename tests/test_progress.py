"""The lines the CLI prints per iteration and the evaluation table, from metric names."""

from __future__ import annotations

import io

from rich.console import Console

from empg_rllib.core import metrics
from empg_rllib.sampling.progress import TerminalProgress, evaluation_table


def test_the_iteration_line_shows_the_summary_metrics_and_each_split_s_success():
    console = Console(file=io.StringIO(), width=200, color_system=None)
    show = TerminalProgress(console).iteration_printer(iterations=20)
    show(3, {
        metrics.SUMMARY_KEYS["success"]: 0.25,
        metrics.STEP_ENTROPY_MEAN: 0.5,
        metrics.evaluation("eval_unseen", metrics.SUCCESS_RATE): 0.125,
        metrics.evaluation("eval_unseen", metrics.SCORE_MEAN): 0.75,  # not a success rate: not shown
        "time_total_s": 12.0,
    })
    assert console.file.getvalue().strip() == "iter 3/20  success 0.25  H_step 0.5  eval eval_unseen 0.125"


def test_the_evaluation_table_has_a_row_per_policy_and_split():
    result = {metrics.SUCCESS_RATE: 0.5, metrics.SCORE_MEAN: 0.625, metrics.EPISODE_LEN_MEAN: 7.25, metrics.EPISODES: 8.0}
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(evaluation_table("t", {"SFT only": {"eval_seen": result}, "SFT + RL": {"eval_seen": result}}))
    rows = [line for line in console.file.getvalue().splitlines() if "eval_seen" in line]
    assert len(rows) == 2 and all(cells in rows[0] for cells in ("SFT only", "50.0%", "0.625", "7.2", "8"))
