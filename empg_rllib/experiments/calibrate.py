"""`empg calibrate`: before spending GPU hours, does the model's step entropy carry the signal EMPG
needs? Plays episodes without training, in rounds of one training batch each (the experiment's
`tasks_per_batch` groups of `group_size`, its sampling temperature), scores every step with the
learner's pass exactly as training does (`EMPG.score_steps`), and asks of the result whether
failed trajectories are the uncertain ones (core/calibration.py). Writes calibration.json,
calibration.md and calibration.png.

Several checkpoints (or a run directory) play the same tasks each, so the sets compare.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from empg_rllib.config.schema import CALIBRATION_SEED, Experiment
from empg_rllib.core.advantages import empg_terms
from empg_rllib.core.batch import drop_uninformative_groups, episode_advantages
from empg_rllib.core.calibration import (
    BOOTSTRAP_RESAMPLES,
    INTERVAL,
    SIGNAL_AUROC,
    auroc_estimate,
    confident_errors,
    failed_weight_share,
    success_by_decile,
    verdict,
)
from empg_rllib.core.records import EpisodeRequest, whole_groups
from empg_rllib.experiments.figures import Panel, plot_cumulative, save_panels
from empg_rllib.sampling.progress import SamplingHook
from empg_rllib.workflows.runs import CHECKPOINT_PREFIX, load_checkpoint, restore_checkpoint
from empg_rllib.workflows.training import build_algorithm

#: Histogram buckets for the entropy distributions.
BUCKETS = 60


#: What checkpoints calibrated together must share: the tasks, the prompt's shape and the sampling.
SAME_PLAY = ("env", "env_config", "max_turns", "group_size", "tasks_per_batch", "temperature", "max_new_tokens",
             "think", "history_turns", "constrain_actions", "list_admissible_actions", "empg")


class CalibrationError(ValueError):
    """Bad input to `empg calibrate`, found before any episode is played."""


@dataclass(frozen=True)
class Source:
    """What plays: a model directory, or a checkpoint (its weights restored over its model)."""

    label: str
    model_path: str
    checkpoint: Path | None = None


@dataclass
class StepSet:
    """One calibration set, a value per step (`entropy`, `won` of its trajectory, ...), with
    EMPG's terms at the experiment's settings computed per round as training would per batch."""

    label: str
    iteration: int | None
    episodes: int
    success_rate: float
    dropped_groups: int  # groups with a member whose environment crashed on every retry
    entropy: np.ndarray
    won: np.ndarray
    trajectory: np.ndarray
    group: np.ndarray  # the task's group: its rollouts share a task, so they are resampled together
    task_type: np.ndarray
    base_advantage: np.ndarray
    # EMPG's advantage of the step as training would use it; 0 for a step DAPO's filter drops.
    empg_advantage: np.ndarray
    g: np.ndarray  # NaN for a step DAPO's filter drops
    f_next: np.ndarray
    has_next: np.ndarray
    confident_error: np.ndarray  # bool, per round as training logs it


def checkpoints_of(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Each path a checkpoint, or a run directory standing for all its checkpoints in order;
    CalibrationError naming a path that is neither."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if (path / "algorithm").is_dir():
            found.append(path)
            continue
        inside = sorted(p for p in path.glob(f"{CHECKPOINT_PREFIX}*") if (p / "algorithm").is_dir())
        if not inside:
            raise CalibrationError(f"{raw}: neither an empg checkpoint (no algorithm/ in it) nor a run directory "
                                   f"with {CHECKPOINT_PREFIX}* checkpoints")
        found.extend(inside)
    return found


def checkpoint_sources(paths: Sequence[str | os.PathLike]) -> tuple[Experiment, list[Source]]:
    """The experiment of the checkpoints (they must share what playing depends on) and a source
    per checkpoint, labelled `<run>/<checkpoint>` when they come from several runs."""
    checkpoints = checkpoints_of(paths)
    several_runs = len({path.parent.resolve() for path in checkpoints}) > 1
    sources, exp = [], None
    for path in checkpoints:
        try:
            checkpoint_exp, model_path = load_checkpoint(path)
        except FileNotFoundError as err:
            raise CalibrationError(str(err)) from None
        if exp is None:
            exp, first = checkpoint_exp, path
        else:
            differ = [k for k in SAME_PLAY if getattr(checkpoint_exp, k) != getattr(exp, k)]
            if differ:
                raise CalibrationError(f"{path} and {first} differ in {', '.join(differ)}: calibrate checkpoints "
                                       "that play the same way (one run's, or runs of one experiment)")
        label = f"{path.parent.name}/{path.name}" if several_runs else path.name
        sources.append(Source(label, model_path, path))
    assert exp is not None  # checkpoints_of found at least one
    return exp, sources


def check_episodes(exp: Experiment, episodes: int) -> None:
    if episodes < exp.group_size or episodes % exp.group_size:
        raise CalibrationError(f"--episodes {episodes}: must be a positive multiple of group_size ({exp.group_size}), "
                               "since steps are weighed by their group's advantage as in training")


def requests_of(exp: Experiment, episodes: int, seed: int) -> list[list[EpisodeRequest]]:
    """Rounds of at most `tasks_per_batch` groups of `group_size`, `episodes` in all."""
    check_episodes(exp, episodes)
    rng = np.random.default_rng(seed)
    tasks = [int(rng.integers(0, 2**31)) for _ in range(episodes // exp.group_size)]
    rounds = [tasks[i : i + exp.tasks_per_batch] for i in range(0, len(tasks), exp.tasks_per_batch)]
    return [
        [EpisodeRequest(seed=task, group=f"calibrate-{r}-{t}") for t, task in enumerate(batch) for _ in range(exp.group_size)]
        for r, batch in enumerate(rounds)
    ]


def play(algo: Any, exp: Experiment, label: str, rounds: list[list[EpisodeRequest]], split: str) -> StepSet:
    """Play and score every round with `algo`'s current weights; no update. Each round is one
    training batch: the outcome advantages, DAPO's filter and EMPG's batch normalisation apply
    to it as `EMPG.training_step` applies them."""
    rows: list[dict[str, np.ndarray]] = []
    episodes, wins, dropped, offset = 0, 0, 0, 0
    for requests in rounds:
        played = algo.sample_episodes(requests, split=split, temperature=exp.temperature, evaluation=True)
        played, crashed = whole_groups(requests, played)
        dropped += len(crashed)
        if not played:
            continue
        episodes += len(played)
        wins += sum(e.won for e in played)
        advantage = episode_advantages(played, scale_by_std=exp.advantage == "grpo")
        batch, _, entropy = algo.score_steps(played)
        group = np.array([str(e.group) for e in played])[batch.traj_index]
        base = advantage[batch.traj_index]
        # Training modulates only the groups DAPO keeps; the others get no weight at all.
        trained = np.ones(len(base), dtype=bool)
        if exp.loss == "dapo":
            kept = {str(e.group) for e in drop_uninformative_groups(played)[0]}
            trained = np.isin(group, list(kept))
        g, f_next, has_next, empg = np.full(len(base), np.nan), np.zeros(len(base)), np.zeros(len(base), bool), np.zeros(len(base))
        if trained.any():
            terms = empg_terms(entropy[trained], batch.traj_index[trained], batch.step_index[trained], base[trained],
                               **exp.empg.modulation())
            g[trained], f_next[trained], has_next[trained], empg[trained] = terms.g, terms.f_next, terms.has_next, terms.advantage
        rows.append({
            "entropy": entropy, "won": np.array([e.won for e in played], dtype=bool)[batch.traj_index],
            "trajectory": batch.traj_index + offset, "group": group,
            "task_type": np.array([e.task_type for e in played])[batch.traj_index], "base_advantage": base,
            "empg_advantage": empg, "g": g, "f_next": f_next, "has_next": has_next,
            "confident_error": confident_errors(entropy, base),
        })
        offset += len(played)
    if not episodes:
        raise CalibrationError(f"{label}: no whole group was played on split {split!r} (every one crashed)")
    joined = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    return StepSet(label=label, iteration=algo.iteration or None, episodes=episodes, success_rate=wins / episodes,
                   dropped_groups=dropped, **joined)


def collect(
    exp: Experiment, sources: list[Source], split: str, episodes: int, seed: int = CALIBRATION_SEED,
    on_sampling: SamplingHook | None = None,
) -> list[StepSet]:
    """One StepSet per source, all on the same tasks. Checkpoints share one algorithm, each
    restored in turn."""
    rounds = requests_of(exp, episodes, seed)
    first = sources[0]
    shared = first.checkpoint.parent if first.checkpoint else None
    algo = build_algorithm(exp, first.model_path, on_sampling, shared_dir=shared)
    try:
        sets = []
        for source in sources:
            if source.checkpoint is not None:
                restore_checkpoint(algo, source.checkpoint)
            sets.append(play(algo, exp, source.label, rounds, split))
        return sets
    finally:
        algo.stop()


# ---- the analysis --------------------------------------------------------------------------
def _mean(values: np.ndarray) -> float | None:
    """The mean of the defined values, rounded; None when there are none."""
    values = values[~np.isnan(values)]
    return round(float(values.mean()), 4) if values.size else None


def _round(value: float) -> float | None:
    return None if np.isnan(value) else round(value, 4)


def analyse(steps: StepSet) -> dict[str, Any]:
    """Everything calibration.json says about one set. Intervals resample whole groups: the
    rollouts of one task share its difficulty, which moves both entropy and outcome."""
    failed = ~steps.won
    traj_ids, first = np.unique(steps.trajectory, return_index=True)
    traj_entropy = np.array([steps.entropy[steps.trajectory == t].mean() for t in traj_ids])
    traj_failed, traj_group = failed[first], steps.group[first]
    step_auroc = auroc_estimate(steps.entropy, failed, steps.group)
    label, sentence = verdict(step_auroc)
    by_type = {}
    for task_type in sorted(set(steps.task_type.tolist())):
        rows = steps.task_type == task_type
        of_type = steps.task_type[first] == task_type
        by_type[task_type] = {
            "steps": int(rows.sum()),
            "trajectories": int(of_type.sum()),
            "success_rate": round(float(steps.won[first][of_type].mean()), 4),
            "step_auroc": auroc_estimate(steps.entropy[rows], failed[rows], steps.group[rows]).as_dict(),
            "trajectory_auroc": auroc_estimate(traj_entropy[of_type], traj_failed[of_type], traj_group[of_type]).as_dict(),
        }
    has_next = steps.has_next
    return {
        "label": steps.label,
        "iteration": steps.iteration,
        "episodes": steps.episodes,
        "dropped_groups": steps.dropped_groups,
        "success_rate": round(steps.success_rate, 4),
        "steps": len(steps.entropy),
        "step_auroc": step_auroc.as_dict(),
        "trajectory_auroc": auroc_estimate(traj_entropy, traj_failed, traj_group).as_dict(),
        "by_task_type": by_type,
        "success_by_entropy_decile": success_by_decile(steps.entropy, steps.won),
        "step_entropy_mean": {"success": _mean(steps.entropy[steps.won]), "failure": _mean(steps.entropy[failed])},
        "g_mean": {"success": _mean(steps.g[steps.won]), "failure": _mean(steps.g[failed])},
        "f_mean": {"success": _mean(steps.f_next[has_next & steps.won]), "failure": _mean(steps.f_next[has_next & failed])},
        "failed_weight_share": {
            "outcome_advantage": _round(failed_weight_share(steps.base_advantage, failed)),
            "empg_advantage": _round(failed_weight_share(steps.empg_advantage, failed)),
        },
        "confident_error_share": round(float(steps.confident_error.mean()), 4),
        "verdict": {"label": label, "text": sentence},
    }


# ---- the outputs ---------------------------------------------------------------------------
def interval(estimate: dict[str, float | None]) -> str:
    if estimate["value"] is None:
        return "undefined"
    if estimate["low"] is None:
        return f"{estimate['value']:.2f}"
    return f"{estimate['value']:.2f} [{estimate['low']:.2f}, {estimate['high']:.2f}]"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def summary_markdown(exp: Experiment, split: str, results: list[dict[str, Any]]) -> str:
    settings = exp.empg
    lines = [
        f"# Calibration: {exp.model} on {exp.env} ({split})",
        "",
        f"Step entropy as training defines it (`empg.step_entropy: {settings.step_entropy}`); EMPG's terms at "
        f"k={settings.k}, k_f={settings.k_f}, zeta={settings.zeta}, over batches of {exp.tasks_per_batch} groups "
        f"of {exp.group_size} as in training (temperature {exp.temperature}). AUROC: of the step entropy for "
        f"\"this step belongs to a failed trajectory\" (step) and of a trajectory's mean step entropy for its "
        f"failure (trajectory); 0.5 is no signal. Intervals: {INTERVAL:.0%} bootstrap resampling whole groups "
        f"(a task's {exp.group_size} rollouts; {BOOTSTRAP_RESAMPLES} resamples). Under DAPO, g, f and EMPG's "
        f"advantage are computed over the groups its filter keeps, as in training.",
        "",
        "| set | episodes | success | step AUROC | trajectory AUROC | H success / failure | g success / failure "
        "| failed share of abs(A): outcome / EMPG | confident errors | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        h, g, share = r["step_entropy_mean"], r["g_mean"], r["failed_weight_share"]
        lines.append(
            f"| {r['label']} | {r['episodes']} | {r['success_rate']:.0%} | {interval(r['step_auroc'])} "
            f"| {interval(r['trajectory_auroc'])} | {_num(h['success'])} / {_num(h['failure'])} "
            f"| {_num(g['success'])} / {_num(g['failure'])} | {_percent(share['outcome_advantage'])} / "
            f"{_percent(share['empg_advantage'])} | {r['confident_error_share']:.0%} | {r['verdict']['label']} |"
        )
    last = results[-1]
    lines += ["", "## Verdict", "", f"**{last['verdict']['label']}** ({last['label']}). {last['verdict']['text']}", "",
              f"Thresholds: signal when the step AUROC is at least {SIGNAL_AUROC} and its interval lies above 0.5; "
              "weak signal when the interval lies above 0.5 but the AUROC is lower; reversed when the interval "
              "lies below 0.5; none when it contains 0.5.", "", "## Per task type", ""]
    lines += ["| set | task type | trajectories | success | step AUROC | trajectory AUROC |", "|---|---|---|---|---|---|"]
    for r in results:
        for task_type, t in r["by_task_type"].items():
            lines.append(f"| {r['label']} | {task_type} | {t['trajectories']} | {t['success_rate']:.0%} "
                         f"| {interval(t['step_auroc'])} | {interval(t['trajectory_auroc'])} |")
    lines += ["", "![calibration](calibration.png)", ""]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def draw(exp: Experiment, sets: list[StepSet], results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    last, result = sets[-1], results[-1]
    edges = np.linspace(0.0, max(float(last.entropy.max()), 1e-6), BUCKETS + 1)

    def distributions(ax: Any) -> None:
        for won, color, word in ((True, "tab:green", "successful"), (False, "tab:red", "failed")):
            values = last.entropy[last.won == won]
            if values.size:
                plot_cumulative(ax, edges, np.histogram(values, edges)[0], color=color,
                                label=f"steps of {word} trajectories ({values.size})")

    def deciles(ax: Any) -> None:
        bins = result["success_by_entropy_decile"]
        centres = [(b["entropy_low"] + b["entropy_high"]) / 2 for b in bins]
        ax.plot(centres, [100 * b["success_rate"] for b in bins], marker="o", color="tab:blue",
                label=f"{len(bins)} equal-count bins of steps")
        ax.axhline(100 * float(last.won.mean()), color="grey", linestyle="--", label="all steps")

    def g_values(ax: Any) -> None:
        for won, color, word in ((True, "tab:green", "successful"), (False, "tab:red", "failed")):
            rows = last.won == won
            ax.scatter(last.entropy[rows], last.g[rows], s=6, alpha=0.5, color=color, label=f"{word}")

    panels = [
        Panel(f"Step entropy by outcome: {last.label}", "step entropy (nats)", "steps at or below (%)", distributions, True),
        Panel(f"Success by step-entropy bin: {last.label}", "step entropy (nats, bin centre)",
              "steps in won trajectories (%)", deciles, True),
        Panel(f"EMPG's g at k={exp.empg.k}: {last.label}", "step entropy (nats)", "g (dimensionless)", g_values),
    ]
    if len(sets) > 1:
        palette = matplotlib.colormaps["tab10"].colors

        def over_checkpoints(ax: Any) -> None:
            x = np.arange(len(results))
            for i, key in enumerate(("step_auroc", "trajectory_auroc")):
                values = [r[key] for r in results]
                mid = np.array([np.nan if v["value"] is None else v["value"] for v in values])
                low = np.array([np.nan if v["low"] is None else v["low"] for v in values])
                high = np.array([np.nan if v["high"] is None else v["high"] for v in values])
                # A percentile interval need not contain its estimate: no negative bar.
                ax.errorbar(x + 0.05 * i, mid, yerr=np.clip([mid - low, high - mid], 0, None), marker="o", capsize=3,
                            color=palette[i], label=key.replace("_", " "))
            ax.axhline(0.5, color="grey", linestyle="--", label="no signal")
            ax.set_xticks(x, [r["label"] for r in results], rotation=30, ha="right", fontsize="small")

        panels.append(Panel("AUROC of entropy for failure across checkpoints", "checkpoint", "AUROC", over_checkpoints))
    save_panels(panels, f"Does step entropy flag failure? ({INTERVAL:.0%} bootstrap intervals)", path)


def write(exp: Experiment, split: str, sets: list[StepSet], out: str | os.PathLike) -> tuple[Path, list[dict[str, Any]]]:
    """calibration.json, calibration.md and calibration.png into `out`; returns the markdown's
    path and each set's results."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = [analyse(s) for s in sets]
    payload = {
        "model": exp.model, "env": exp.env, "env_config": exp.env_config, "split": split,
        "empg": exp.empg.model_dump(), "temperature": exp.temperature,
        "tasks_per_batch": exp.tasks_per_batch, "group_size": exp.group_size,
        "thresholds": {"signal_auroc": SIGNAL_AUROC, "interval": INTERVAL, "resamples": BOOTSTRAP_RESAMPLES},
        "sets": results,
        "step_entropies": {s.label: {"success": s.entropy[s.won].round(5).tolist(),
                                     "failure": s.entropy[~s.won].round(5).tolist()} for s in sets},
    }
    (out / "calibration.json").write_text(json.dumps(payload, indent=1) + "\n")
    draw(exp, sets, results, out / "calibration.png")
    markdown = out / "calibration.md"
    markdown.write_text(summary_markdown(exp, split, results))
    return markdown, results
