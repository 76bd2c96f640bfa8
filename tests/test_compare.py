"""`empg compare`: arms x seeds from one file, validated first, finished runs kept on a rerun,
a table of held-out success and the report's figures."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from empg_rllib.config.schema import ConfigError
from empg_rllib.experiments import compare
from empg_rllib.workflows import training
from tests.helpers import SMALL

BASE = {
    **SMALL, "env": "deepsearch", "max_turns": 2, "max_new_tokens": 8,
    "evaluation": {"splits": ["eval_seen"], "episodes": 2},
}


def compare_file(tmp_path, **settings) -> str:
    path = tmp_path / "tiny-compare.yaml"
    data = {"run_dir": str(tmp_path / "runs"), "experiment": BASE, "arms": ["grpo", "dapo+empg"], "seeds": [0, 1], **settings}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_every_run_is_validated_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="unknown arm 'ppo'"):
        compare.load(compare_file(tmp_path, arms=["grpo", "ppo"]))
    with pytest.raises(ConfigError, match="overrides.loss: set by the comparison"):
        compare.load(compare_file(tmp_path, overrides={"loss": "dapo"}))
    with pytest.raises(ConfigError, match="experiment with overrides: bad value for 'group_size'"):
        compare.load(compare_file(tmp_path, overrides={"group_size": 0}))
    comparison = compare.load(compare_file(tmp_path, arms=list(compare.ARMS)))
    by_arm = {r.arm: r.experiment for r in comparison.runs if r.seed == 0}
    assert by_arm["grpo"].loss == "grpo" and not by_arm["grpo"].empg.enabled
    assert by_arm["dapo+empg-g-only"].empg.use_scaling and not by_arm["dapo+empg-g-only"].empg.use_bonus
    assert by_arm["dapo+empg-f-only"].empg.use_bonus and not by_arm["dapo+empg-f-only"].empg.use_scaling
    assert [(r.arm, r.seed) for r in comparison.runs][:2] == [("grpo", 0), ("grpo+empg", 0)]
    assert {r.experiment.iterations for r in comparison.runs} == {1}  # the same budget for every arm


def test_comparison_runs_every_arm_and_seed_and_keeps_finished_runs(ray_cluster, model_path, tmp_path, monkeypatch):
    comparison = compare.load(compare_file(tmp_path))
    results = compare.run(comparison, log=lambda line: None)
    assert sorted(results) == [("dapo+empg", 0), ("dapo+empg", 1), ("grpo", 0), ("grpo", 1)]
    table_path, report = compare.write_results(comparison, results)
    table = table_path.read_text()
    assert "| grpo | " in table and "| dapo+empg | " in table and " ± " in table
    assert report.exists() and (report.parent / "learning_curves.png").exists()
    cells = compare.summary(comparison, results)
    for arm in ("grpo", "dapo+empg"):
        seeds = cells[arm]["eval_seen"]["seeds"]
        assert len(seeds) == 2 and cells[arm]["eval_seen"]["mean"] == pytest.approx(sum(seeds) / 2)
        scores = [results[(arm, s)]["evaluation"]["eval_seen"]["score_mean"] for s in (0, 1)]
        assert cells[arm]["eval_seen"]["score"]["seeds"] == scores

    # A rerun trains and evaluates nothing that finished; a run that lost its final evaluation
    # (interrupted after training) is evaluated again, not trained again.
    evaluated = []
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    real_evaluate = training.evaluate
    monkeypatch.setattr(training, "evaluate", lambda *a, **k: evaluated.append(a[0]) or real_evaluate(*a, **k))
    (comparison.runs[1].dir / compare.FINAL_EVAL).unlink()
    again = compare.run(comparison, log=lambda line: None)
    assert len(evaluated) == 1 and comparison.runs[1].dir.name == "dapo+empg"
    assert again[("grpo", 0)] == results[("grpo", 0)]


def test_the_table_adds_mean_scores_where_scores_give_partial_credit(tmp_path):
    comparison = compare.load(compare_file(tmp_path))

    def evaluated(success: float, score: float) -> dict:
        return {"evaluation": {split: {"success_rate": success, "score_mean": score} for split in comparison.splits}}

    binary = {("grpo", 0): evaluated(0.25, 0.25), ("grpo", 1): evaluated(0.5, 0.5),
              ("dapo+empg", 0): evaluated(0.0, 0.0), ("dapo+empg", 1): evaluated(0.25, 0.25)}
    table = compare.markdown(comparison, compare.summary(comparison, binary))
    assert "| grpo | 37.5% ± 17.7% |" in table and "score" not in table
    one_seed_missing = {k: v for k, v in binary.items() if k != ("dapo+empg", 1)}
    table = compare.markdown(comparison, compare.summary(comparison, one_seed_missing))
    assert "| dapo+empg | 0.0% (1 of 2) |" in table
    partial = {**binary, ("grpo", 1): evaluated(0.5, 0.75)}
    table = compare.markdown(comparison, compare.summary(comparison, partial))
    header = [f"{split} success" for split in comparison.splits] + [f"{split} score" for split in comparison.splits]
    assert "| arm | " + " | ".join(header) + " |" in table
    row = ["37.5% ± 17.7%"] * len(comparison.splits) + ["0.500 ± 0.354"] * len(comparison.splits)
    assert "| grpo | " + " | ".join(row) + " |" in table


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parent.parent / "tuned_examples" / "compare").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_compare_files_validate(path):
    comparison = compare.load(path)
    assert len(comparison.runs) == len(comparison.settings.arms) * len(comparison.settings.seeds) >= 12
    assert comparison.base.warm_start == "sft"
