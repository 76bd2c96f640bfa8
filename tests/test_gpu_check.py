"""benchmarks/gpu_check.py at `--device cpu`: it must run where only torch, transformers and peft
are installed, so the run blocks every other package the project uses."""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@functools.cache
def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    foreign = load_script().FOREIGN
    # A None entry in sys.modules makes `import name` fail, as on a machine without the package.
    runner = (
        "import runpy, sys\n"
        f"for name in {foreign!r}: sys.modules[name] = None\n"
        f"sys.argv = ['gpu_check.py', '--device', 'cpu', '--out', {str(out)!r}]\n"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    )
    subprocess.run([sys.executable, "-c", runner], check=True, cwd=ROOT, timeout=300)
    return json.loads(out.read_text())


def test_every_section_runs_without_the_packages_a_gpu_machine_lacks(report: dict) -> None:
    sections = report["sections"]
    assert list(sections) == list(load_script().SECTIONS)
    assert {name: s.get("error") for name, s in sections.items() if "error" in s or "skipped" in s} == {}
    assert report["imports"]["foreign_loaded"] == []
    assert "empg_rllib.sampling.engines.hf" in report["imports"]["project"]
    assert report["sections"]["environment"]["device"] == "cpu"


def test_engine_sampling_is_seeded_and_constrained_decoding_matches_the_learner(report: dict) -> None:
    engine = report["sections"]["hf_engine"]
    assert engine["seeded_repeat_equal"] and engine["row_seeds_repeat_equal"]
    assert engine["other_seed_differs"]
    constrained = engine["constrained"]
    assert constrained["admissible"] and constrained["finished_on_choice"]
    assert constrained["logp_gap_fp32"]["max_abs"] < 1e-4
    assert constrained["choice_mass_max_error"] < 1e-4
    rates = [v["tokens_per_s"] for k, v in engine["throughput"].items() if k.startswith("batch_")]
    assert len(rates) == 3 and all(r > 0 for r in rates)


def test_loss_parity_memory_lora_and_checkpointing_hold(report: dict) -> None:
    s = report["sections"]
    assert s["loss"]["loss_finite"] and s["loss"]["grads_finite"] and s["loss"]["grad_norm"] > 0
    assert s["parity"]["fp32"]["max_abs"] < 1e-4 and s["parity"]["fp32"]["tokens"] > 0
    for mode in ("no_grad", "forward_backward"):
        assert s["scoring_memory"][mode]["logp_max_abs_diff"] < 1e-4
    lora = s["lora_merge"]
    assert lora["adapted_layers"] == lora["expected_layers"] > 0
    assert lora["adapter_effect_max_abs"] > 1e-4 > lora["merge_max_abs_diff"]
    ckpt = s["gradient_checkpointing"]
    assert ckpt["enabled"] and ckpt["grads_finite"] and ckpt["grads_max_rel_diff"] < 1e-4


def test_a_failing_section_is_recorded_and_the_next_still_runs(tmp_path: Path) -> None:
    gpu_check = load_script()
    import torch

    ctx = gpu_check.Context(torch.device("cpu"), gpu_check.SHAPES["cpu"], 0, deadline=float("inf"))

    def broken(ctx):
        raise RuntimeError("out of memory")

    out = tmp_path / "report.json"
    gpu_check.run_sections({"broken": broken, "next": lambda ctx: {"ok": True}}, ctx, {"sections": {}}, out)
    written = json.loads(out.read_text())["sections"]
    assert written["broken"]["error"] == "RuntimeError: out of memory"
    assert written["next"]["ok"] is True


def test_sections_past_the_deadline_are_skipped_and_say_so(tmp_path: Path) -> None:
    gpu_check = load_script()
    import torch

    ctx = gpu_check.Context(torch.device("cpu"), gpu_check.SHAPES["cpu"], 0, deadline=0.0)
    out = tmp_path / "report.json"
    gpu_check.run_sections({"late": lambda ctx: {"ran": True}}, ctx, {"sections": {}}, out)
    assert json.loads(out.read_text())["sections"]["late"]["skipped"] == "over --max-seconds"
