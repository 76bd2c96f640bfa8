"""Live progress: what the driver knows while it works, and its view in the terminal.

The algorithm never prints. It hands `SamplingProgress` records to a hook (`EMPG.on_sampling`);
SFT reports each optimiser step through its `log` callback. The CLI passes the hooks of a
`TerminalProgress`, which keeps one live line (rich) under the lines the run prints.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from empg_rllib.core import metrics

if TYPE_CHECKING:
    from empg_rllib.core.records import Episode, RolloutStats


@dataclass(frozen=True)
class SamplingProgress:
    """A batch of episodes being played, as far as the driver knows it.

    The driver's own env runner reports after every engine batch. Remote runners' episodes
    reach the driver only when a runner returns its whole share (`foreach_env_runner`), so with
    `runners` > 0 the counts stay at 0 until the runners are done.
    """

    label: str  # "iteration 3/8" or "evaluating eval_unseen"
    episodes: int  # requested
    evaluation: bool = False
    runners: int = 0  # remote env runners playing the batch; 0: the driver's own runner
    finished: int = 0
    env_steps: int = 0
    generated_tokens: int = 0
    done: bool = False

    def counting(self, stats: RolloutStats) -> SamplingProgress:
        """Counts so far, from the running stats of the driver's own runner."""
        return replace(self, finished=stats.episodes, env_steps=stats.env_steps, generated_tokens=stats.generated_tokens)

    def finished_with(self, episodes: Sequence[Episode]) -> SamplingProgress:
        """The batch done, counted from its episodes."""
        turns = [t for e in episodes for t in e.turns]
        tokens = sum(len(t.response_ids) for t in turns)
        return replace(self, finished=len(episodes), env_steps=len(turns), generated_tokens=tokens, done=True)


#: Called with every update of a batch being sampled.
SamplingHook = Callable[[SamplingProgress], None]


class TerminalProgress:
    """One live line under the printed output: spinner, what runs, a bar where the total is
    known, numbers, elapsed time. It disappears when done (only printed lines stay) and is off
    when the output is not a terminal (a log file gets the printed lines alone)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._live = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=20),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            refresh_per_second=4,
            disable=not console.is_terminal,
            # Not sys.stdout: a library that keeps the stream it finds at import (colorama, under
            # textworld's tatsu, writes a reset there at exit) would write into rich's proxy,
            # which prints a string without a newline as markup after the display is gone.
            redirect_stdout=False,
        )
        self._task: TaskID | None = None
        self._label = ""
        self._started = time.monotonic()

    def __enter__(self) -> TerminalProgress:
        self._live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._live.stop()

    def show(self, label: str, detail: str = "", total: float | None = None, completed: float = 0) -> None:
        """Show `label` on the live line; a new label starts a new line and its clock."""
        if self._task is None or label != self._label:
            self.clear()
            self._task = self._live.add_task(label, total=total, completed=completed, detail=detail)
            self._label, self._started = label, time.monotonic()
        else:
            self._live.update(self._task, total=total, completed=completed, detail=detail)

    def clear(self) -> None:
        if self._task is not None:
            self._live.remove_task(self._task)
            self._live.refresh()  # else a line printed next is followed by the stale frame
        self._task, self._label = None, ""

    @contextlib.contextmanager
    def phase(self, label: str) -> Iterator[None]:
        """A spinner with `label` while the block runs (more specific progress may replace it)."""
        self.show(label)
        try:
            yield
        finally:
            self.clear()

    def sampling(self, progress: SamplingProgress) -> None:
        """The `SamplingHook` of the algorithm."""
        if progress.done:
            if progress.evaluation:
                self.clear()
            else:  # a training batch goes on to the learner (scoring, update, weight sync)
                self.show(f"{progress.label} updating the policy")
            return
        label = progress.label if progress.evaluation else f"{progress.label} sampling"
        detail = f"{progress.finished}/{progress.episodes} episodes"
        if progress.runners and not progress.finished:
            detail += f" on {progress.runners} env runners (counted when each is done)"
        elapsed = time.monotonic() - self._started if label == self._label else 0.0
        if progress.env_steps and elapsed > 0:
            detail += (
                f" · {progress.env_steps / elapsed:.1f} env steps/s"
                f" · {progress.generated_tokens / elapsed:.0f} tokens/s"
            )
        self.show(label, detail, total=progress.episodes, completed=progress.finished)

    def sft_logger(self, epochs: int, heldout_episodes: int = 0) -> Callable[[dict[str, float]], None]:
        """The `log` callback of sft.run_sft: epoch, step (of `steps`) and loss of every
        optimiser step."""
        after = "SFT: saving the model"
        if heldout_episodes:
            after += f", scoring {heldout_episodes} held-out expert episodes"

        def log(record: dict[str, float]) -> None:
            step, total = int(record["step"]), int(record["steps"])
            if step == total:
                self.show(after)
                return
            detail = f"epoch {int(record['epoch']) + 1}/{epochs} · step {step}/{total} · loss {record['loss']:.3f}"
            self.show("SFT training", detail, total=total, completed=step)

        return log

    def iteration_printer(self, iterations: int) -> Callable[[int, dict[str, float]], None]:
        """The `on_iteration` callback of training.train: one printed line per iteration with
        the summary metrics and any evaluation's success."""

        def show(iteration: int, scalars: dict[str, float]) -> None:
            self.clear()
            parts = [f"[bold]iter {iteration}/{iterations}[/bold]"]
            for label, key in metrics.SUMMARY_KEYS.items():
                if key in scalars:
                    value = scalars[key]
                    parts.append(f"{label} {value:.3g}" if abs(value) < 1000 else f"{label} {value:.0f}")
            for key, value in scalars.items():
                section, split, name = (key.split("/") + ["", ""])[:3]
                if section == metrics.EVALUATION and name == metrics.SUCCESS_RATE:
                    parts.append(f"eval {split} {value:.3g}")
            self.console.print("  ".join(parts))

        return show


def evaluation_table(title: str, rows: dict[str, dict[str, dict[str, float]]]) -> Table:
    """Evaluation results, one row per policy and split: {policy: {split: result}}."""
    table = Table(title=title)
    for column in ("policy", "split", "success", "score", "mean turns", "episodes"):
        table.add_column(column)
    for policy, splits in rows.items():
        for split, r in splits.items():
            table.add_row(
                policy,
                split,
                f"{r[metrics.SUCCESS_RATE]:.1%}",
                f"{r[metrics.SCORE_MEAN]:.3f}",
                f"{r[metrics.EPISODE_LEN_MEAN]:.1f}",
                f"{int(r[metrics.EPISODES])}",
            )
    return table
