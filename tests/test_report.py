"""`empg report` on synthetic runs laid out as `training.train` leaves them: TensorBoard scalars
under the tags it writes, a step-entropy histogram, the experiment saved with a checkpoint, and
a run with only history.json. No Ray."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml

from empg_rllib.cli import main
from empg_rllib.core.statistics import success_gain
from empg_rllib.experiments.report import FIGURES, write_report
from empg_rllib.experiments.run_logs import ReportError, group_runs, load_run

TYPES = ("look_at_obj_in_light", "pick_and_place_simple")


def write_run(
    root: Path, name: str, seed: int, success: list[float], splits: tuple[str, ...] = ("eval_seen", "eval_unseen"),
    empg: bool = True, loss: str = "dapo", dirname: str | None = None,
) -> Path:
    """Training success `success[i]` at iteration i + 1; an evaluation every 2 iterations of
    success / 2 (+ 0.1 on eval_unseen); 100 + seed env steps and 60 + seed seconds per iteration."""
    from torch.utils.tensorboard import SummaryWriter

    run = root / (dirname or f"{name}-seed{seed}")
    writer = SummaryWriter(str(run / "tensorboard"))
    rng = np.random.default_rng(seed)
    for iteration, rate in enumerate(success, start=1):
        scalars = {
            "env_runners/success_rate": rate,
            "num_env_steps_sampled_lifetime": (100 + seed) * iteration,
            "env_runners/num_env_steps_sampled_lifetime": (100 + seed) * iteration,
            "time_total_s": (60 + seed) * iteration,
            "step_entropy_mean": 0.5,
            "step_entropy_p10": 0.1,
            "step_entropy_p50": 0.5 - 0.02 * iteration,
            "step_entropy_p90": 0.9,
            "step_entropy_mean_success": 0.3,
            "step_entropy_mean_failure": 0.6,
            "confident_error_share": 0.2,
            **{f"env_runners/success_rate_by_type/{t}": rate / (k + 1) for k, t in enumerate(TYPES)},
        }
        if empg:
            scalars.update({"empg_g_mean": 1.0, "empg_g_min": 0.5, "empg_g_max": 2.0,
                            "empg_f_mean": 0.6, "empg_f_min": 0.3, "empg_f_max": 1.0})
        if iteration % 2 == 0:
            scalars.update({f"evaluation/{s}/success_rate": rate / 2 + 0.1 * (s == "eval_unseen") for s in splits})
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, iteration)
        writer.add_histogram("step_entropy", rng.gamma(2.0, 0.25 - 0.02 * iteration, 64), iteration)
    writer.close()
    checkpoint = run / f"checkpoint_{len(success):06d}"
    checkpoint.mkdir(parents=True)
    exp = {"name": name, "seed": seed, "loss": loss, "empg": {"enabled": empg, "use_scaling": True, "use_bonus": True}}
    (checkpoint / "experiment.yaml").write_text(yaml.safe_dump(exp))
    return run


def write_history_run(root: Path, name: str, success: list[float]) -> Path:
    """A run with history.json alone (the keys of metrics.SUMMARY_KEYS) and no checkpoint."""
    run = root / name
    run.mkdir(parents=True)
    history = [{"iteration": i, "success": rate, "H_step": 0.4, "loss": None} for i, rate in enumerate(success, 1)]
    (run / "history.json").write_text(json.dumps(history))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    write_run(root, "alpha", 0, [0.25, 0.5, 0.75, 0.5])
    write_run(root, "alpha", 1, [0.0, 0.25, 0.25, 1.0])
    write_run(root, "beta", 0, [0.5, 0.75], splits=("eval_unseen",), empg=False, loss="grpo")
    write_history_run(root, "gamma", [0.125, 0.375, 0.25])
    return root


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    """The first markdown table of `markdown`: run label -> {column: cell}."""
    lines = [line for line in markdown.split("## Figures")[0].splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: dict(zip(header, row)) for row in rows}


def pm(values: list[float], percent: bool = True, digits: int = 1) -> str:
    scale, unit = (100, "%") if percent else (1, "")
    return (f"{statistics.fmean(values) * scale:,.{digits}f}{unit} ± "
            f"{statistics.stdev(values) * scale:,.{digits}f}{unit}")


def test_report_groups_seeds_and_compares_runs(runs, tmp_path):
    report = write_report([runs], tmp_path / "out")
    out = report.parent
    for name in FIGURES:
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000, name
    text = report.read_text()
    rows = table_rows(text)
    assert list(rows) == ["alpha", "beta", "gamma"]

    alpha = rows["alpha"]
    assert alpha["algorithm"] == "DAPO + EMPG" and alpha["seeds"] == "0, 1" and alpha["iterations"] == "4"
    assert alpha["final training success"] == pm([0.5, 1.0]) == "75.0% ± 35.4%"
    assert alpha["final eval success: eval_seen"] == pm([0.25, 0.5])
    assert alpha["final eval success: eval_unseen"] == pm([0.35, 0.6])
    assert alpha["env steps"] == pm([400, 404], percent=False, digits=0) == "402 ± 3"
    assert alpha["wall time (min)"] == pm([240 / 60, 244 / 60], percent=False)

    beta = rows["beta"]
    assert (beta["algorithm"], beta["seeds"], beta["iterations"]) == ("GRPO", "0", "2")
    assert beta["final training success"] == "75.0%"
    assert beta["final eval success: eval_seen"] == "—"
    assert beta["final eval success: eval_unseen"] == "47.5%"

    gamma = rows["gamma"]  # history.json: no checkpoint, no env steps, time or evaluation
    assert (gamma["algorithm"], gamma["seeds"], gamma["iterations"]) == ("?", "?", "3")
    assert gamma["final training success"] == "25.0%"
    assert gamma["env steps"] == gamma["wall time (min)"] == gamma["final eval success: eval_unseen"] == "—"

    for name in FIGURES:
        assert f"]({name}.png)" in text
    assert "Skipped" not in text
    assert "Only in the iteration panel: gamma" in text
    assert "Not in it (no EMPG terms logged): beta, gamma." in text
    assert "| history.json |" in text and text.count("| tensorboard |") == 3


def test_a_figure_without_data_is_skipped_and_said_so(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "step_entropy.png").write_bytes(b"an earlier report's figure")
    text = write_report([runs / "gamma"], out).read_text()
    assert (out / "learning_curves.png").exists()
    for name in ("success_by_task_type", "step_entropy", "entropy_vs_outcome", "empg_terms"):
        # Also gone from an earlier report in the same folder: it would pass for this one's.
        assert not (out / f"{name}.png").exists(), name
        assert f"]({name}.png)" not in text
    assert text.count("Skipped: no run logged") == 4
    assert "Skipped: no run logged a success rate per task type" in text


def test_runs_of_one_name_and_seed_are_told_apart_by_directory(tmp_path):
    """Two sweeps' trial_000, both seed 0, are different experiments, not seeds of one."""
    a = write_run(tmp_path / "sweep-a", "trial_000", 0, [0.5], dirname="trial_000")
    b = write_run(tmp_path / "sweep-b", "trial_000", 0, [0.25], dirname="trial_000")
    groups = group_runs([load_run(a), load_run(b)])
    assert [(g.label, len(g.runs)) for g in groups] == [("sweep-a/trial_000", 1), ("sweep-b/trial_000", 1)]


def test_a_bad_path_is_named_before_anything_is_written(runs, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ReportError, match="nowhere: no such directory"):
        write_report([runs / "alpha-seed0", tmp_path / "nowhere"], out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="empty: no run in it"):
        write_report([tmp_path / "empty"], out)
    with pytest.raises(ReportError, match="history.json: not a directory"):
        write_report([runs / "gamma" / "history.json"], out)
    assert not out.exists()


def test_cli_report(runs, tmp_path, capsys):
    out = tmp_path / "cli-report"
    assert main(["report", str(runs / "gamma"), str(runs / "beta-seed0"), "--out", str(out)]) == 0
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    assert list(table_rows((out / "report.md").read_text())) == ["gamma", "beta"]
    with pytest.raises(SystemExit, match=r"empg report: .*missing-run: no such directory"):
        main(["report", str(tmp_path / "missing-run"), "--out", str(out)])


def test_success_gain_and_its_binomial_standard_error():
    gain, se = success_gain({"success_rate": 0.25, "episodes": 48}, {"success_rate": 0.5, "episodes": 48})
    assert gain == pytest.approx(0.25)
    assert se == pytest.approx((0.25 * 0.75 / 48 + 0.5 * 0.5 / 48) ** 0.5)
    # More episodes, the same rates: a smaller error; no spread at 0 or 1.
    assert success_gain({"success_rate": 0.25, "episodes": 192}, {"success_rate": 0.5, "episodes": 192})[1] == pytest.approx(se / 2)
    assert success_gain({"success_rate": 0.0, "episodes": 10}, {"success_rate": 1.0, "episodes": 10}) == (1.0, 0.0)
    # An evaluation that played nothing (every episode crashed) has no error to give.
    assert success_gain({"success_rate": 0.0, "episodes": 0}, {"success_rate": 0.5, "episodes": 8}) == (0.5, None)
