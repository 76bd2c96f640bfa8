"""The project as a user installs it: a wheel (not an editable install) in a fresh venv runs
`empg demo` from an unrelated directory and finds its shipped experiment files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from empg_rllib.config.loading import experiment_path
from empg_rllib.config.schema import ConfigError

ROOT = Path(__file__).resolve().parent.parent

# A demo small enough for a test: the same file, a fraction of its episodes and iterations.
TINY_DEMO = [
    "sft.episodes=3", "sft.epochs=1", "sft.heldout_episodes=0", "iterations=1", "checkpoint_every=1",
    "tasks_per_batch=1", "group_size=2", "evaluation.episodes=2",
]


def test_shipped_examples_are_found_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no tuned_examples/ here
    assert experiment_path("tuned_examples/demo.yaml").read_text() == (ROOT / "tuned_examples" / "demo.yaml").read_text()
    assert experiment_path("demo.yaml").name == "demo.yaml"
    with pytest.raises(ConfigError, match="nor among the shipped examples"):
        experiment_path("tuned_examples/nope.yaml")


@pytest.mark.slow
@pytest.mark.ray  # `empg demo` trains with its own Ray
@pytest.mark.timeout(900)
def test_wheel_in_a_fresh_venv_runs_the_demo(tmp_path):
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for part in ("empg_rllib", "envs"):
        shutil.copytree(ROOT / part, source / part, ignore=ignore)
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, source / part)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)], check=True)
    [wheel] = (tmp_path / "dist").glob("empg_rllib-*.whl")

    # A fresh venv with the wheel installed, which reaches this venv's dependencies through a
    # .pth line (installing torch, Ray and the rest again would download gigabytes).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True, capture_output=True, text=True
    ).stdout.strip()
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], check=True)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": ""}
    where = subprocess.run([python, "-c", "import empg_rllib; print(empg_rllib.__file__)"], cwd=work, env=env,
                           check=True, capture_output=True, text=True).stdout
    assert where.startswith(purelib), where  # the wheel, not this checkout
    sets = [arg for item in TINY_DEMO for arg in ("--set", item)]
    run = subprocess.run([venv / "bin" / "empg", "demo", *sets], cwd=work, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "demo finished" in run.stdout
    summary = json.loads((work / "runs" / "demo" / "demo_summary.json").read_text())
    for split in ("eval_seen", "eval_unseen"):
        gain = summary["after_rl"][split]["success_rate"] - summary["before_rl"][split]["success_rate"]
        assert summary["gain"][split]["gain"] == pytest.approx(gain)
        assert f"RL's gain over SFT on {split}: {gain:+.1%}" in run.stdout
    assert any((work / "runs" / "demo").glob("checkpoint_*/algorithm"))
