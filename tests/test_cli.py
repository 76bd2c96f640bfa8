"""The terminal side of a run: a run directory that holds an earlier run, the live progress
line, and the library notices kept out of the user's terminal."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
from dataclasses import replace

import pytest
from rich.console import Console

from empg_rllib.cli import main
from empg_rllib.sampling.progress import SamplingProgress, TerminalProgress
from empg_rllib.workflows.runs import check_run_dir, clear_run_dir


def earlier_run(run_dir, checkpoints=(1, 2)):
    for i in checkpoints:
        (run_dir / f"checkpoint_{i:06d}" / "algorithm").mkdir(parents=True)
    (run_dir / "history.json").write_text("[]")
    (run_dir / "tensorboard").mkdir()
    (run_dir / "sft_model").mkdir()
    (run_dir / "sft_model" / "config.json").write_text("{}")


def test_new_train_in_a_run_dir_with_checkpoints_refuses_before_any_work(tmp_path):
    import ray

    path = tmp_path / "exp.yaml"
    path.write_text(f"name: old\nenv: deepsearch\nrun_dir: {tmp_path}\n")
    earlier_run(tmp_path / "old")
    with pytest.raises(SystemExit, match=r"checkpoint_000002.*--resume.*--overwrite"):
        main(["train", str(path)])
    assert not ray.is_initialized()
    assert (tmp_path / "old" / "checkpoint_000002").is_dir()  # nothing touched
    with pytest.raises(SystemExit, match="no checkpoint"):
        main(["train", str(path), "--resume", "--set", "name=new"])
    with pytest.raises(SystemExit):  # argparse: one or the other
        main(["train", str(path), "--resume", "--overwrite"])


def test_starting_over_deletes_the_earlier_run_and_nothing_else(tmp_path):
    earlier_run(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        check_run_dir(tmp_path, resume=False)
    assert clear_run_dir(tmp_path) == ["checkpoint_000001", "checkpoint_000002", "history.json", "sft_model", "tensorboard"]
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    check_run_dir(tmp_path, resume=False)
    assert clear_run_dir(tmp_path / "never-made") == []


def live_line(display: TerminalProgress) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(display._live)
    return console.export_text().strip()


@pytest.fixture
def display():
    return TerminalProgress(Console(force_terminal=True, width=200, file=io.StringIO()))


def test_sampling_line_counts_episodes_and_rates_then_the_update(display):
    batch = SamplingProgress(label="iteration 2/8", episodes=32)
    display.sampling(batch)
    assert "iteration 2/8 sampling" in live_line(display) and "0/32 episodes" in live_line(display)
    display.sampling(replace(batch, finished=12, env_steps=150, generated_tokens=4000))
    line = live_line(display)
    assert "12/32 episodes" in line and "env steps/s" in line and "tokens/s" in line
    display.sampling(replace(batch, finished=32, done=True))
    assert "iteration 2/8 updating the policy" in live_line(display)
    display.clear()
    assert live_line(display) == ""


def test_remote_and_evaluation_sampling_lines(display):
    remote = SamplingProgress(label="evaluating eval_unseen", episodes=16, evaluation=True, runners=2)
    display.sampling(remote)
    assert "evaluating eval_unseen" in live_line(display) and "on 2 env runners" in live_line(display)
    display.sampling(replace(remote, finished=16, done=True))
    assert live_line(display) == ""  # nothing follows an evaluation batch


def test_sft_line_counts_steps_and_names_what_follows(display):
    log = display.sft_logger(epochs=2, heldout_episodes=16)
    lines = []
    for step, epoch in enumerate([0, 0, 0, 1, 1, 1], start=1):
        log({"step": step, "steps": 6, "epoch": epoch, "loss": 1.0 / step})
        lines.append(live_line(display))
    assert "epoch 1/2 · step 2/6 · loss 0.500" in lines[1]
    assert "epoch 2/2 · step 4/6" in lines[3]
    assert "SFT: saving the model, scoring 16 held-out expert episodes" in lines[5]


NOISY = """
import sys
if sys.argv[1] == "quiet":
    from empg_rllib.workflows.library_logs import quiet_libraries

    quiet_libraries()
from ray.tune.utils import UtilMonitor
from empg_rllib.algorithm.empg import EMPGConfig
from empg_rllib.config.loading import validate

config = EMPGConfig().experiment_from(validate({}), sys.argv[2])
config.validate()  # the new-API-stack notice
spec = config.get_default_rl_module_spec()
spec.observation_space, spec.action_space = config.token_spaces()
spec.build()  # RLlib's own RLModuleConfig deprecation warning
UtilMonitor(start=True).stop()  # "Install gputil"
if sys.argv[3] == "deepspeed":
    import deepspeed  # "Setting accelerator to CPU"
"""


@pytest.mark.slow  # two fresh interpreters importing Ray, RLlib and DeepSpeed: about a minute
def test_library_notices_stay_out_of_the_terminal(model_path):
    notices = ["on the new API stack", "RLModule(config=", "Install gputil"]
    deepspeed = importlib.util.find_spec("deepspeed") is not None
    if deepspeed:
        notices.append("Setting accelerator to CPU")

    def output(mode: str) -> str:
        run = [sys.executable, "-c", NOISY, mode, model_path, "deepspeed" if deepspeed else "-"]
        done = subprocess.run(run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        assert done.returncode == 0, done.stdout
        return done.stdout

    loud = output("loud")
    assert all(notice in loud for notice in notices), loud  # the libraries still say these
    quiet = output("quiet")
    assert not any(notice in quiet for notice in notices), quiet
