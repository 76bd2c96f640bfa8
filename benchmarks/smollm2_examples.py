"""The real-model experiment files (tuned_examples/smollm2/*.yaml) as they run on this machine:
zero-shot success of SmolLM2-135M-Instruct on the held-out splits, and the wall time of one
training iteration with its parts (sampling, learner scoring, weight sync, the rest), with each
engine.

    python benchmarks/smollm2_examples.py [--files alfworld webshop] [--engines hf vllm] [--episodes 16]

Writes benchmarks/results/smollm2_examples.{json,png} (`--out` names them otherwise).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, write

EXAMPLES = Path(__file__).resolve().parent.parent / "empg_rllib" / "tuned_examples" / "smollm2"


def measure(path: Path, engine: str, episodes: int, run_dir: str) -> dict[str, Any]:
    from empg_rllib.config.loading import load
    from empg_rllib.core import metrics
    from empg_rllib.workflows.models import resolve_model
    from empg_rllib.workflows.training import build_algorithm

    exp = load(path).model_copy(update={"engine": engine, "run_dir": run_dir, "checkpoint_every": 0})
    started = time.perf_counter()
    algo = build_algorithm(exp, str(resolve_model(exp.model)))
    built = time.perf_counter()
    try:
        zero_shot = algo.evaluate_splits(exp.evaluation.splits, episodes)
        evaluated = time.perf_counter()
        result = algo.train()
        trained = time.perf_counter()
    finally:
        algo.stop()
    runners = result[metrics.ENV_RUNNERS]
    iteration_s = trained - evaluated
    steps, rate = runners.get("num_env_steps_sampled"), runners.get(metrics.ENV_STEPS_PER_S)
    return {
        "file": path.name,
        "engine": engine,
        "dtype": exp.dtype,
        "zero_shot": zero_shot,
        "episodes_per_split": episodes,
        "build_s": built - started,
        "evaluation_s": evaluated - built,
        "iteration_s": iteration_s,
        "train_episodes": runners.get("num_episodes"),
        "train_success_rate": _number(runners.get(metrics.SUCCESS_RATE)),
        "env_steps_per_s": _number(rate),
        "generated_tokens_per_s": _number(runners.get(metrics.GENERATED_TOKENS_PER_S)),
        "sampling_s": _number(steps / rate) if steps and rate else None,
        # None where the iteration skipped its update (no group with differing rewards).
        "learner_score_s": _number(result.get(metrics.LEARNER_SCORE_S)),
        "weight_sync_s": _number(result.get(metrics.WEIGHT_SYNC_S)),
        "skipped_update": bool(result.get("skipped_iterations")),
    }


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [f"{r['file'].removesuffix('.yaml')}\n{r['engine']}" for r in rows]
    ax.bar(labels, [r["iteration_s"] for r in rows], color="tab:blue")
    ax.set_ylabel("one training iteration (s)")
    for i, r in enumerate(rows):
        seen = r["zero_shot"].get("eval_seen", {}).get("success_rate")
        if seen is not None:
            ax.annotate(f"zero-shot {seen:.0%}", (i, r["iteration_s"]), ha="center", va="bottom", fontsize=8)
    ax.set_title("SmolLM2-135M-Instruct: tuned_examples/smollm2 on this CPU")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="*", default=[p.stem for p in sorted(EXAMPLES.glob("*.yaml")) if p.stem != "demo"])
    parser.add_argument("--engines", nargs="*", default=["hf", "vllm"])
    parser.add_argument("--episodes", type=int, default=16, help="zero-shot episodes per held-out split")
    parser.add_argument("--out", default="smollm2_examples", help="results name: <out>.json and <out>.png")
    args = parser.parse_args()
    from empg_rllib.workflows.library_logs import quiet_libraries
    from empg_rllib.workflows.session import ray_session

    quiet_libraries()
    rows = []
    with tempfile.TemporaryDirectory(prefix="empg-bench-") as run_dir, ray_session():
        for name in args.files:
            for engine in args.engines:
                row = measure(EXAMPLES / f"{name}.yaml", engine, args.episodes, f"{run_dir}/{name}-{engine}")
                print(row, flush=True)
                rows.append(row)
    path = write(args.out, {"rows": rows})
    plot(rows, RESULTS / f"{args.out}.png")
    print(path)


if __name__ == "__main__":
    main()
