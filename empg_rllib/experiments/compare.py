"""`empg compare FILE.yaml`: the paper's comparison on one environment, arms x seeds.

A compare file names a base experiment, fixed overrides of it, the arms (default: GRPO,
GRPO+EMPG, DAPO, DAPO+EMPG and DAPO+EMPG's two ablations, g only and f only) and the seeds.
Every run gets the same budget (the base experiment's iterations, batch and model) and the same
warm start: when the base says `warm_start: sft`, one SFT model is trained first and every run
starts from it. Runs go one after another (a CPU box fits one at a time) into
`<run_dir>/<name>/seed<N>/<arm>/`, each ending with a held-out evaluation written to
`final_eval.json`; an interrupted comparison continues where it stopped: a run with its final
evaluation is skipped, a run with checkpoints resumes from the latest. The result is a markdown
table of held-out success (mean ± sample std over seeds) and `empg report`'s figures.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from empg_rllib.config.loading import base_experiment, read_file, validate, with_values
from empg_rllib.config.schema import ConfigError, Experiment
from empg_rllib.core.statistics import mean_std
from empg_rllib.experiments.tables import mean_std_cell
from empg_rllib.util.fileio import write_json

#: The arms of the paper's comparison, as experiment overrides.
_BOTH = {"empg.use_scaling": True, "empg.use_bonus": True}
ARMS: dict[str, dict[str, Any]] = {
    "grpo": {"loss": "grpo", "empg.enabled": False},
    "grpo+empg": {"loss": "grpo", "empg.enabled": True, **_BOTH},
    "dapo": {"loss": "dapo", "empg.enabled": False},
    "dapo+empg": {"loss": "dapo", "empg.enabled": True, **_BOTH},
    "dapo+empg-g-only": {"loss": "dapo", "empg.enabled": True, **_BOTH, "empg.use_bonus": False},
    "dapo+empg-f-only": {"loss": "dapo", "empg.enabled": True, **_BOTH, "empg.use_scaling": False},
}
#: Keys the comparison sets for each run.
COMPARE_OWNED = ("name", "run_dir", "seed", "loss", "empg.enabled", "empg.use_bonus", "empg.use_scaling")
FINAL_EVAL = "final_eval.json"
TABLE = "comparison.md"


class CompareFile(BaseModel):
    """What a `tuned_examples/compare/*.yaml` file may say."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None  # default: the file's stem
    run_dir: str = "runs/compare"
    experiment: str | dict[str, Any]  # a path (relative to this file, or a shipped example) or a mapping
    overrides: dict[str, Any] = {}  # dotted keys fixed for every run
    arms: list[str] = Field(list(ARMS), min_length=1)
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    # The final held-out evaluation: episodes per split (default: the experiment's evaluation).
    eval_episodes: int | None = Field(None, ge=1)

    @field_validator("arms")
    @classmethod
    def _known_arms(cls, arms: list[str]) -> list[str]:
        if unknown := [a for a in arms if a not in ARMS]:
            raise ValueError(f"arms among {', '.join(ARMS)}; unknown arm {unknown[0]!r}")
        if len(set(arms)) != len(arms):
            raise ValueError("an arm is listed twice")
        return arms


@dataclass(frozen=True)
class Run:
    arm: str
    seed: int
    experiment: Experiment

    @property
    def dir(self) -> Path:
        return self.experiment.directory


@dataclass(frozen=True)
class Comparison:
    path: Path
    name: str
    dir: Path
    settings: CompareFile
    base: Experiment  # for the shared SFT warm start and the evaluation settings
    runs: list[Run]

    @property
    def splits(self) -> list[str]:
        return list(self.base.evaluation.splits)

    @property
    def eval_episodes(self) -> int:
        return self.settings.eval_episodes or self.base.evaluation.episodes


def load(path: str | os.PathLike) -> Comparison:
    """Read a compare file and validate every run's experiment (no Ray, no work)."""
    path, settings = read_file(path, CompareFile)
    if owned := [k for k in settings.overrides if k in COMPARE_OWNED]:
        raise ConfigError(f"overrides.{owned[0]}: set by the comparison for each run")
    name = settings.name or path.stem
    root = (Path(settings.run_dir) / name).resolve()
    base = with_values(base_experiment(settings.experiment, path), settings.overrides)
    try:
        base_exp = validate({**base, "run_dir": str(root), "name": "base"})
    except ConfigError as err:
        raise ConfigError(f"experiment with overrides: {err}") from None
    runs = []
    for seed in settings.seeds:
        for arm in settings.arms:
            data = with_values(base, {**ARMS[arm], "seed": seed, "name": arm, "run_dir": str(root / f"seed{seed}")})
            # The shared SFT model replaces each run's own warm start.
            data["warm_start"] = "none"
            try:
                runs.append(Run(arm, seed, validate(data)))
            except ConfigError as err:
                raise ConfigError(f"arm {arm}, seed {seed}: {err}") from None
    return Comparison(path, name, root, settings, base_exp, runs)


def final_eval(run: Run) -> dict[str, dict[str, float]] | None:
    path = run.dir / FINAL_EVAL
    return json.loads(path.read_text()) if path.exists() else None


def warm_start_model(
    comparison: Comparison, log: Callable[[str], None], sft_log: Callable[[dict[str, float]], None] | None = None
) -> str:
    """The model every run starts from: the base model, or one SFT model trained once."""
    from empg_rllib.workflows import models
    from empg_rllib.workflows.runs import SFT_MODEL
    from empg_rllib.workflows.sft import run_sft, warm_start

    base = comparison.base

    def sft(exp: Experiment, out: Path) -> None:
        log(f"SFT warm start for every arm: {exp.sft.episodes} expert episodes, {exp.sft.epochs} epochs")
        run_sft(exp, out, log=sft_log)

    return warm_start(base, str(models.resolve_model(base.model)), comparison.dir / SFT_MODEL, sft)


def run(
    comparison: Comparison,
    log: Callable[[str], None] = print,
    on_sampling: Any = None,
    sft_log: Callable[[dict[str, float]], None] | None = None,
) -> dict[tuple[str, int], dict[str, Any]]:
    """Train and evaluate every run not finished yet, one after another; returns every run's
    final evaluation keyed by (arm, seed). `on_sampling` and `sft_log`: live progress hooks
    (progress.SamplingHook, SFT's per-step log)."""
    from empg_rllib.workflows.runs import CHECKPOINT_PREFIX, latest_checkpoint
    from empg_rllib.workflows.training import evaluate, train

    comparison.dir.mkdir(parents=True, exist_ok=True)
    model_path = warm_start_model(comparison, log, sft_log)
    results = {}
    for i, r in enumerate(comparison.runs, 1):
        label = f"[{i}/{len(comparison.runs)}] {r.arm} seed {r.seed}"
        done = final_eval(r)
        if done is not None:
            log(f"{label}: finished earlier, skipped")
            results[(r.arm, r.seed)] = done
            continue
        started = time.perf_counter()
        latest = latest_checkpoint(r.dir)
        final = f"{CHECKPOINT_PREFIX}{r.experiment.iterations:06d}"
        if latest is None or latest.name != final:
            log(f"{label}: training{' (resuming from ' + latest.name + ')' if latest else ''}")
            latest = Path(train(r.experiment, model_path, resume=latest is not None, on_sampling=on_sampling)["checkpoint"])
        evaluation = evaluate(latest, comparison.splits, comparison.eval_episodes, on_sampling=on_sampling)
        done = {"arm": r.arm, "seed": r.seed, "evaluation": evaluation, "wall_s": time.perf_counter() - started}
        write_json(r.dir / FINAL_EVAL, done)
        results[(r.arm, r.seed)] = done
        shown = ", ".join(f"{s} {v['success_rate']:.3f}" for s, v in evaluation.items())
        log(f"{label}: {shown} ({done['wall_s']:.0f} s)")
    return results


def _stats(values: list[float]) -> dict[str, Any]:
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "seeds": values}


def summary(comparison: Comparison, results: dict[tuple[str, int], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm and split: held-out success mean, sample std (None for one seed) and per-seed
    values; under "score" the same for the mean score (partial credit, as WebShop's)."""
    out: dict[str, dict[str, Any]] = {}
    for arm in comparison.settings.arms:
        out[arm] = {}
        for split in comparison.splits:
            evaluations = [results[(arm, s)]["evaluation"][split] for s in comparison.settings.seeds if (arm, s) in results]
            out[arm][split] = {
                **_stats([e["success_rate"] for e in evaluations]),
                "score": _stats([e["score_mean"] for e in evaluations]),
            }
    return out


def _cell(stats: dict[str, Any], percent: bool, seeds: int) -> str:
    return mean_std_cell(stats["seeds"], seeds, percent=percent, digits=1 if percent else 3)


def markdown(comparison: Comparison, table: dict[str, dict[str, Any]]) -> str:
    """The success table, with mean-score columns where scores give partial credit."""
    base = comparison.base
    seeds = comparison.settings.seeds
    partial = any(
        abs(a - b) > 1e-9
        for splits in table.values() for cell in splits.values() for a, b in zip(cell["seeds"], cell["score"]["seeds"])
    )
    columns = [(split, "success") for split in comparison.splits]
    if partial:
        columns += [(split, "score") for split in comparison.splits]
    lines = [
        f"Held-out {'success and mean score' if partial else 'success'} after RL on `{base.env}`: mean ± sample "
        f"std over seeds {', '.join(map(str, seeds))} "
        f"({comparison.eval_episodes} episodes per split and seed; {base.iterations} iterations of "
        f"{base.tasks_per_batch} tasks x {base.group_size} rollouts, model `{base.model}`"
        f"{', SFT warm start shared by every arm' if base.warm_start == 'sft' else ''}).",
        "",
        "| arm | " + " | ".join(f"{split} {what}" if partial else split for split, what in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for arm, splits in table.items():
        cells = [_cell(splits[split] if what == "success" else splits[split]["score"], what == "success", len(seeds))
                 for split, what in columns]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(comparison: Comparison, results: dict[tuple[str, int], dict[str, Any]]) -> tuple[Path, Path]:
    """comparison.md (the table) and the report's figures under report/; returns both paths."""
    from empg_rllib.experiments.report import write_report

    table = summary(comparison, results)
    path = comparison.dir / TABLE
    path.write_text(markdown(comparison, table))
    write_json(comparison.dir / "comparison.json", table)
    report = write_report([str(comparison.dir / f"seed{s}") for s in comparison.settings.seeds], comparison.dir / "report")
    return path, report
