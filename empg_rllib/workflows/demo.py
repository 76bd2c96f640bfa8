"""The embedded default, end to end: the offline model, an SFT warm start on expert
demonstrations (`warm_start: sft`; a pretrained model starts as it is), EMPG RL from it, and
both policies evaluated on the held-out splits."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from empg_rllib.config.schema import Experiment
from empg_rllib.core.metrics import WALL_S
from empg_rllib.core.statistics import success_gains
from empg_rllib.util.fileio import write_json
from empg_rllib.workflows import models
from empg_rllib.workflows.runs import RAY_LOGS, SFT_MODEL, clear_run_dir
from empg_rllib.workflows.session import ray_session
from empg_rllib.workflows.sft import describe, run_sft
from empg_rllib.workflows.training import evaluate, evaluate_model, train

SUMMARY_FILE = "demo_summary.json"


class Progress(Protocol):
    """What the demo shows while it works (the CLI's live display)."""

    sampling: Any

    def phase(self, label: str) -> Any: ...

    def sft_logger(self, epochs: int, heldout_episodes: int = 0) -> Callable[[dict[str, float]], None]: ...


def run_demo(
    exp: Experiment,
    progress: Progress,
    say: Callable[[str], None],
    on_iteration: Callable[[int, dict[str, float]], None] | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """Run the demo of `exp` from scratch (an earlier demo run in its directory is deleted) and
    return its summary, also written to `<run dir>/demo_summary.json`: the SFT run (None without
    `warm_start: sft`), both evaluations (`before_rl`: the SFT model, or the base model zero-shot),
    RL's gain per split with its standard error, the wall time and where it went (time_split)."""
    run_dir = exp.directory
    removed = clear_run_dir(run_dir)
    started = time.perf_counter()
    if removed:
        say(f"starting over: deleted the previous demo run's {', '.join(removed)} from {run_dir}")
    clock = PhaseClock()
    with progress.phase(f"preparing the model {exp.model!r}"), clock("model"):
        start_model = str(models.resolve_model(exp.model))
    say(f"1. model {start_model} ({time.perf_counter() - started:.0f}s)")
    sft = None
    if exp.warm_start == "sft":
        with progress.phase(f"SFT: collecting {exp.sft.episodes} expert episodes"), clock("sft"):
            sft = run_sft(exp, run_dir / SFT_MODEL, log=progress.sft_logger(exp.sft.epochs, exp.sft.heldout_episodes))
        say(f"2. {describe(exp, sft)}")
        start_model = sft["model"]
    start = start_label(exp)
    rl_exp = exp.model_copy(update={"model": start_model})
    splits, episodes = exp.evaluation.splits, exp.evaluation.episodes
    with ray_session(address=address, logs_to=run_dir / RAY_LOGS):
        with progress.phase(f"evaluating the {start} model"), clock("evaluation_before_rl"):
            before = evaluate_model(rl_exp, start_model, splits, episodes, on_sampling=progress.sampling)
        say(f"3. {start} evaluation done ({time.perf_counter() - started:.0f}s)")
        say(f"4. RL: {exp.iterations} iterations of {exp.loss.upper()}{' + EMPG' if exp.empg.enabled else ''}")
        with progress.phase("building the algorithm"), clock("rl"):
            summary = train(rl_exp, start_model, on_iteration=on_iteration, on_sampling=progress.sampling)
        with progress.phase("evaluating the RL policy"), clock("evaluation_after_rl"):
            rl_results = evaluate(summary["checkpoint"], splits, episodes, on_sampling=progress.sampling)
    report = {
        "experiment": exp.model_dump(),
        "sft": sft,
        "before_rl": before,
        "after_rl": rl_results,
        "gain": success_gains(before, rl_results),
        "wall_s": (wall := time.perf_counter() - started),
        "time_s": time_split(clock.seconds, sft, before, rl_results, summary["time_s"], wall),
        "checkpoint": summary["checkpoint"],
    }
    write_json(run_dir / SUMMARY_FILE, report)
    return report


def start_label(exp: Experiment) -> str:
    """What RL starts from, in words: the SFT model, or the base model zero-shot."""
    return "SFT" if exp.warm_start == "sft" else "zero-shot"


class PhaseClock:
    """The seconds each named phase of the demo took."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = time.perf_counter() - started


def time_split(
    phases: dict[str, float],
    sft: dict[str, Any] | None,
    before: dict[str, dict[str, float]],
    after: dict[str, dict[str, float]],
    rl: dict[str, float],
    wall: float,
) -> dict[str, float]:
    """The demo's wall time by part, in seconds, adding up to `wall`: the model, SFT's
    collection / training / held-out check, each evaluation's splits and its start (building the
    algorithm and engines), RL's iterations by part (metrics.time_split) and what RL spent outside
    them (start, checkpoints), and `other` (the Ray session, the summary)."""
    split = {"model": phases["model"]}
    if sft is not None:
        split.update({f"sft_{part}": sft[f"{part}_s"] for part in ("collect", "train", "heldout")})
        split["sft_other"] = phases["sft"] - sum(split[f"sft_{p}"] for p in ("collect", "train", "heldout"))
    for phase, results in (("evaluation_before_rl", before), ("evaluation_after_rl", after)):
        per_split = {f"{phase}/{name}": result[WALL_S] for name, result in results.items()}
        split.update(per_split)
        split[f"{phase}/start"] = phases[phase] - sum(per_split.values())
    split.update({f"rl/{part}": seconds for part, seconds in rl.items() if part != "total"})
    split["rl/outside_iterations"] = phases["rl"] - rl.get("total", 0.0)
    split["other"] = wall - sum(split.values())
    return split
