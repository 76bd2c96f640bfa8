"""`empg calibrate`: the statistics against values computed by hand, the command end to end on the
tiny model (a model, and a run's checkpoints), and bad input refused before any episode."""

from __future__ import annotations

import json

import numpy as np
import pytest

from empg_rllib.cli import main
from empg_rllib.core.calibration import (
    Estimate,
    auroc,
    auroc_estimate,
    confident_errors,
    failed_weight_share,
    success_by_decile,
    verdict,
)
from empg_rllib.experiments.calibrate import StepSet
from tests.helpers import SMALL

# ---- the statistics on a fixed set of steps -------------------------------------------------
#: Six steps of three trajectories: t0 won (0.1, 0.3), t1 failed (0.35, 0.8), t2 failed (0.3, 0.9).
ENTROPY = np.array([0.1, 0.3, 0.35, 0.8, 0.3, 0.9])
FAILED = np.array([False, False, True, True, True, True])
TRAJECTORY = np.array([0, 0, 1, 1, 2, 2])


def test_auroc_counts_pairs_and_half_ties():
    # Failed vs won pairs: 0.35 beats both, 0.8 and 0.9 beat both, 0.3 beats 0.1 and ties 0.3:
    # (2 + 2 + 2 + 1.5) / 8.
    assert auroc(ENTROPY, FAILED) == pytest.approx(7.5 / 8)
    assert auroc(-ENTROPY, FAILED) == pytest.approx(0.5 / 8)
    assert auroc(np.ones(4), np.array([True, False, True, False])) == 0.5
    assert np.isnan(auroc(ENTROPY, np.zeros(6, dtype=bool)))


def test_bootstrap_interval_resamples_trajectories():
    estimate = auroc_estimate(ENTROPY, FAILED, TRAJECTORY, seed=0, resamples=200)
    assert estimate.value == pytest.approx(7.5 / 8)
    assert estimate.low <= estimate.value <= estimate.high <= 1.0
    # Perfect separation stays perfect in every resample that has both outcomes.
    separated = auroc_estimate(np.array([0.1, 0.2, 0.8, 0.9]), np.array([False, False, True, True]), np.arange(4))
    assert (separated.value, separated.low, separated.high) == (1.0, 1.0, 1.0)
    # Whole trajectories move together: with two trajectories the AUROC of a resample is 1
    # (one won, one failed) or undefined, never a mix of their steps.
    two = auroc_estimate(np.array([0.1, 0.2, 0.8, 0.9]), np.array([False, False, True, True]), np.array([0, 0, 1, 1]))
    assert (two.low, two.high) == (1.0, 1.0)
    assert auroc_estimate(ENTROPY, FAILED, TRAJECTORY, seed=3) == auroc_estimate(ENTROPY, FAILED, TRAJECTORY, seed=3)


def test_success_by_decile_bins_steps_by_entropy():
    entropy = np.arange(20, dtype=float)[::-1]  # order of arrival must not matter
    won = entropy < 10
    bins = success_by_decile(entropy, won)
    assert [b["steps"] for b in bins] == [2] * 10
    assert [b["success_rate"] for b in bins] == [1.0] * 5 + [0.0] * 5
    assert (bins[0]["entropy_low"], bins[0]["entropy_high"], bins[-1]["entropy_high"]) == (0.0, 1.0, 19.0)
    assert len(success_by_decile(ENTROPY, ~FAILED)) == 6  # fewer steps than bins: one step each


def test_weight_share_and_confident_errors_by_hand():
    assert failed_weight_share(np.array([1.0, -1.0, -2.0, 0.0]), np.array([False, True, True, False])) == pytest.approx(0.75)
    assert np.isnan(failed_weight_share(np.zeros(3), np.array([True, False, True])))
    # Median 0.325: steps below it in trajectories with a negative advantage.
    base = np.where(FAILED, -1.0, 1.0)
    assert confident_errors(ENTROPY, base).tolist() == [False, False, False, False, True, False]


@pytest.mark.parametrize(
    ("estimate", "label"),
    [
        (Estimate(0.75, 0.62, 0.86), "signal"),
        (Estimate(0.56, 0.51, 0.61), "weak signal"),
        (Estimate(0.52, 0.45, 0.60), "none"),
        (Estimate(0.30, 0.22, 0.41), "reversed"),
        (Estimate(0.60, 0.55, 0.65), "signal"),  # the boundaries: the value at 0.6 counts
        (Estimate(0.59, 0.55, 0.65), "weak signal"),
        (Estimate(0.70, 0.50, 0.80), "none"),  # an interval that reaches 0.5 is no evidence
        (Estimate(0.45, 0.40, 0.50), "none"),
        (Estimate(float("nan"), float("nan"), float("nan")), "undefined"),
        (Estimate(0.75, float("nan"), float("nan")), "undefined"),  # no resample had both outcomes
    ],
)
def test_verdict_thresholds(estimate, label):
    assert verdict(estimate)[0] == label


# ---- the analysis and the outputs on a synthetic set (no Ray) ---------------------------------
def synthetic_set(label: str = "synthetic") -> StepSet:
    """Eight trajectories in four groups of two, three steps each: failures are uncertain,
    except one confident failure; the second group's members both won (DAPO would drop it)."""
    rng = np.random.default_rng(0)
    won_of = np.array([True, False, True, True, True, False, False, True])
    trajectory = np.repeat(np.arange(8), 3)
    won = won_of[trajectory]
    entropy = np.where(won, 0.2, 0.9) + rng.uniform(0, 0.1, len(won))
    entropy[trajectory == 6] = 0.05
    base = np.where(won, 1.0, -1.0)
    base[(trajectory == 2) | (trajectory == 3)] = 0.0
    g = np.where(base == 0, np.nan, 1.0)
    return StepSet(
        label=label, iteration=None, episodes=8, success_rate=float(won_of.mean()), dropped_groups=1,
        entropy=entropy, won=won, trajectory=trajectory, group=(trajectory // 2).astype(str),
        task_type=np.where(trajectory < 4, "pick", "heat"), base_advantage=base, empg_advantage=1.5 * base, g=g,
        f_next=np.ones(len(won)), has_next=np.tile([True, True, False], 8),
        confident_error=np.isin(trajectory, [6]),
    )


def test_analyse_and_outputs_of_a_synthetic_set(tmp_path):
    from empg_rllib.config.loading import validate
    from empg_rllib.experiments.calibrate import analyse, write

    steps = synthetic_set()
    result = analyse(steps)
    failed = ~steps.won
    assert result["step_auroc"]["value"] == pytest.approx(auroc(steps.entropy, failed), abs=1e-4)
    assert result["trajectory_auroc"]["value"] == pytest.approx(10 / 15, abs=1e-4)  # t1, t5 above all 5 wins, t6 below
    assert (result["steps"], result["episodes"], result["dropped_groups"]) == (24, 8, 1)
    assert set(result["by_task_type"]) == {"pick", "heat"}
    assert result["by_task_type"]["pick"]["success_rate"] == 0.75
    # g of a dropped group is undefined and left out of the means, not read as 0.
    assert result["g_mean"] == {"success": 1.0, "failure": 1.0}
    assert result["failed_weight_share"]["outcome_advantage"] == pytest.approx(0.5)
    assert result["confident_error_share"] == pytest.approx(3 / 24, abs=1e-4)
    assert result["verdict"]["label"] in ("signal", "weak signal", "none")

    exp = validate({**SMALL, "env": "deepsearch"})
    markdown, results = write(exp, "train", [synthetic_set("a"), synthetic_set("b")], tmp_path)
    assert [r["label"] for r in results] == ["a", "b"]
    text = markdown.read_text()
    assert text.count("| a |") == 3 and "| b | heat |" in text and "## Verdict" in text  # a row, and one per task type
    data = json.loads((tmp_path / "calibration.json").read_text())
    assert len(data["step_entropies"]["a"]["failure"]) == int(failed.sum())
    assert (tmp_path / "calibration.png").stat().st_size > 10_000


# ---- bad input, before any episode ------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--env", "nope"], r"unknown env id 'nope'"),
        (["--split", "dev"], r"'evaluation.splits'.*'dev'"),
        (["--set", "group_sise=4"], r"group_sise"),
        (["--episodes", "6"], r"--episodes 6: must be a positive multiple of group_size \(8\)"),
        (["--model", "/no/such/model"], r"/no/such/model"),
        (["--model", "small:seed"], r"bad model spec 'small:seed'"),
    ],
)
def test_bad_input_is_refused_before_any_episode(tmp_path, argv, message):
    import ray

    with pytest.raises(SystemExit, match=message):
        main(["calibrate", *argv, "--out", str(tmp_path)])
    assert not ray.is_initialized()
    assert not any(tmp_path.iterdir())


def test_a_checkpoint_that_is_not_one_and_a_file_that_does_not_validate(tmp_path):
    (tmp_path / "run" / "checkpoint_000001").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"neither an empg checkpoint.*nor a run directory"):
        main(["calibrate", "--checkpoint", str(tmp_path / "run" / "checkpoint_000001")])
    with pytest.raises(SystemExit, match=r"neither an empg checkpoint"):
        main(["calibrate", "--checkpoint", str(tmp_path / "run")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("env: deepsearch\nlr: fast\n")
    with pytest.raises(SystemExit, match=r"bad\.yaml|'lr'"):
        main(["calibrate", str(bad)])
    with pytest.raises(SystemExit, match="--checkpoint plays the checkpoint's own experiment"):
        main(["calibrate", str(bad), "--checkpoint", str(tmp_path / "run")])


def fake_checkpoint(run, name: str, **settings) -> None:
    """A directory laid out as a checkpoint (its weights are never read here)."""
    import yaml

    path = run / name
    (path / "algorithm").mkdir(parents=True)
    (path / "experiment.yaml").write_text(yaml.safe_dump({**SMALL, "env": "deepsearch", **settings}))
    (path / "model_path.txt").write_text("tiny:\n")


def test_checkpoints_of_several_runs_are_labelled_by_run_and_must_play_alike(tmp_path):
    from empg_rllib.experiments.calibrate import CalibrationError, checkpoint_sources

    for run in ("a", "b"):
        for name in ("checkpoint_000002", "checkpoint_000001"):
            fake_checkpoint(tmp_path / run, name, lr=1e-3 if run == "a" else 1e-5)  # training may differ
    exp, sources = checkpoint_sources([tmp_path / "a", tmp_path / "b" / "checkpoint_000002"])
    assert [s.label for s in sources] == ["a/checkpoint_000001", "a/checkpoint_000002", "b/checkpoint_000002"]
    assert exp.env == "deepsearch" and all(s.model_path == "tiny:" for s in sources)
    assert [s.label for s in checkpoint_sources([tmp_path / "a"])[1]] == ["checkpoint_000001", "checkpoint_000002"]
    fake_checkpoint(tmp_path / "c", "checkpoint_000001", max_turns=7, temperature=0.5)
    with pytest.raises(CalibrationError, match=r"differ in max_turns, temperature"):
        checkpoint_sources([tmp_path / "a", tmp_path / "c"])


# ---- end to end on the tiny model ---------------------------------------------------------------
def experiment_file(tmp_path, **overrides):
    import yaml

    path = tmp_path / "exp.yaml"
    settings = {**SMALL, "env": "deepsearch", "run_dir": str(tmp_path / "runs"), "name": "cal", **overrides}
    path.write_text(yaml.safe_dump(settings))
    return path


def check_set(result: dict, entropies: dict, episodes: int) -> None:
    steps = len(entropies["success"]) + len(entropies["failure"])
    assert result["episodes"] == episodes and result["steps"] == steps > 0
    assert sum(b["steps"] for b in result["success_by_entropy_decile"]) == steps
    assert all(0.0 <= h for h in entropies["success"] + entropies["failure"])
    if entropies["success"] and entropies["failure"]:
        auc = result["step_auroc"]
        assert 0.0 <= auc["low"] <= auc["value"] <= auc["high"] <= 1.0
        assert result["verdict"]["label"] in ("signal", "weak signal", "none", "reversed")
    else:  # one outcome only: said so, no made-up AUROC
        assert result["step_auroc"]["value"] is None and result["verdict"]["label"] == "undefined"


@pytest.mark.timeout(600)
def test_calibrate_a_model_end_to_end(ray_cluster, model_path, tmp_path):
    out = tmp_path / "out"
    assert main(["calibrate", str(experiment_file(tmp_path)), "--model", model_path, "--episodes", "8",
                 "--out", str(out)]) == 0
    data = json.loads((out / "calibration.json").read_text())
    assert (data["env"], data["split"], data["group_size"]) == ("deepsearch", "train", 2)
    [result] = data["sets"]
    check_set(result, data["step_entropies"][result["label"]], episodes=8)
    assert set(result["by_task_type"]) and result["confident_error_share"] >= 0.0
    assert (out / "calibration.png").stat().st_size > 10_000
    assert "## Verdict" in (out / "calibration.md").read_text()


@pytest.mark.timeout(600)
def test_calibrate_a_runs_checkpoints_on_the_same_tasks(ray_cluster, model_path, tmp_path):
    from empg_rllib.config.loading import load
    from empg_rllib.workflows.training import train

    exp = load(experiment_file(tmp_path, model=model_path, iterations=2, checkpoint_every=1))
    train(exp, model_path)
    out = tmp_path / "out"
    assert main(["calibrate", "--checkpoint", str(exp.directory), "--episodes", "4", "--out", str(out)]) == 0
    data = json.loads((out / "calibration.json").read_text())
    assert [(s["label"], s["iteration"]) for s in data["sets"]] == [("checkpoint_000001", 1), ("checkpoint_000002", 2)]
    for result in data["sets"]:
        check_set(result, data["step_entropies"][result["label"]], episodes=4)
    rows = [line for line in (out / "calibration.md").read_text().splitlines() if line.startswith("| checkpoint_")]
    assert len(rows) == 4  # each checkpoint in the table and in the per-task-type table
    assert (out / "calibration.png").stat().st_size > 10_000
