"""The real-model experiment files (tuned_examples/smollm2/*.yaml) as they run on this machine:
zero-shot success of SmolLM2-135M-Instruct on the held-out splits, and the wall time of one
training iteration with its parts (metrics.time_split: sampling, scoring, update, weight sync,
the rest), with each engine, and the share of this machine's matmul peak (measured in the same
run) that each engine's turns ask of it by the model's shapes.

    python benchmarks/smollm2_examples.py [--files alfworld webshop] [--engines hf vllm] [--episodes 16]
        [--set dtype=float32] [--engines hf hf:prefix_cache=false vllm]

Writes benchmarks/results/smollm2_examples.{json,png} (`--out` names them otherwise).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, flops_per_token, labelled_overrides, matmul_gflops, write

EXAMPLES = Path(__file__).resolve().parent.parent / "empg_rllib" / "tuned_examples" / "smollm2"


def measure(
    path: Path, engine: str, episodes: int, run_dir: str, peaks: dict[str, float], overrides: list[str]
) -> dict[str, Any]:
    from transformers import AutoConfig

    from empg_rllib.config.loading import load
    from empg_rllib.core import metrics
    from empg_rllib.core.precision import resolve_dtype
    from empg_rllib.workflows.models import resolve_model
    from empg_rllib.workflows.training import build_algorithm, flatten

    name, own = labelled_overrides(engine)
    overrides = [*overrides, f"engine={name}", *own]
    exp = load(path, overrides).model_copy(update={"run_dir": run_dir, "checkpoint_every": 0})
    model = resolve_model(exp.model)
    started = time.perf_counter()
    algo = build_algorithm(exp, str(model))
    built = time.perf_counter()
    try:
        zero_shot = algo.evaluate_splits(exp.evaluation.splits, episodes)
        evaluated = time.perf_counter()
        result = algo.train()
    finally:
        algo.stop()
    runners = result[metrics.ENV_RUNNERS]
    split = metrics.time_split(flatten(result))
    prompt_mean = runners.get(metrics.PROMPT_TOKENS_MEAN) or 0.0
    # The FLOPs the model's shapes ask of each turn per engine second: prompts from their first
    # token (a prefix cache that spares some of them shows as more than the engine computed).
    config = AutoConfig.from_pretrained(model)
    engine_gflops = float(
        (runners.get(metrics.PROMPT_TOKENS_PER_S) or 0.0) * flops_per_token(config, prompt_mean / 2, head=False)
        + (runners.get(metrics.GENERATED_TOKENS_PER_S) or 0.0) * flops_per_token(config, prompt_mean)
    ) / 1e9
    # What the engine computes in: vllm.dtype overrides the experiment's for vLLM.
    requested = (exp.vllm.dtype if exp.engine == "vllm" else None) or exp.dtype
    dtype = requested if requested == "float16" else str(resolve_dtype(requested)).removeprefix("torch.")
    return {
        "file": path.name,
        "engine": engine,
        "dtype": dtype,
        "overrides": overrides,
        "zero_shot": zero_shot,
        "episodes_per_split": episodes,
        "build_s": built - started,
        "evaluation_s": evaluated - built,
        "iteration_s": split["total"],
        "time_s": split,
        "other_share": split["other"] / split["total"] if split["total"] else None,
        "train_episodes": runners.get("num_episodes"),
        "train_success_rate": _number(runners.get(metrics.SUCCESS_RATE)),
        "env_steps_per_s": _number(runners.get(metrics.ENV_STEPS_PER_S)),
        "generated_tokens_per_s": _number(runners.get(metrics.GENERATED_TOKENS_PER_S)),
        "prompt_tokens_per_s": _number(runners.get(metrics.PROMPT_TOKENS_PER_S)),
        "prompt_tokens_mean": _number(prompt_mean),
        "engine_gflops": engine_gflops,
        "engine_share_of_peak": engine_gflops / peaks[dtype] if dtype in peaks else None,
        "skipped_update": bool(result.get("skipped_iterations")),
    }


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [f"{r['file'].removesuffix('.yaml')}\n{r['engine']}\n{r['dtype']}" for r in rows]
    bottom = [0.0] * len(rows)
    for part in ("sampling", "scoring", "update", "weight_sync", "evaluation", "other"):
        values = [r["time_s"][part] for r in rows]
        ax.bar(labels, values, bottom=bottom, label=part)
        bottom = [a + b for a, b in zip(bottom, values)]
    for i, r in enumerate(rows):
        ax.annotate(f"{r['env_steps_per_s']:.1f} steps/s" if r["env_steps_per_s"] else "", (i, bottom[i]),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("one training iteration (s)")
    ax.set_title("SmolLM2-135M-Instruct: tuned_examples/smollm2, one iteration by part")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="*", default=[p.stem for p in sorted(EXAMPLES.glob("*.yaml")) if p.stem != "demo"])
    parser.add_argument("--engines", nargs="*", default=["hf", "vllm"],
                        help='engines to run, each "name[:KEY=VALUE,...]" with its own overrides (hf:prefix_cache=false)')
    parser.add_argument("--episodes", type=int, default=16, help="zero-shot episodes per held-out split")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override every file's key")
    parser.add_argument("--out", default="smollm2_examples", help="results name: <out>.json and <out>.png")
    args = parser.parse_args()
    from empg_rllib.workflows.library_logs import quiet_libraries
    from empg_rllib.workflows.session import ray_session

    quiet_libraries()
    peaks = {dtype: matmul_gflops(dtype) for dtype in ("float32", "bfloat16")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="empg-bench-") as run_dir, ray_session():
        for name in args.files:
            for engine in args.engines:
                row = measure(EXAMPLES / f"{name}.yaml", engine, args.episodes, f"{run_dir}/{name}-{len(rows)}", peaks, args.set)
                print(row, flush=True)
                rows.append(row)
    path = write(args.out, {"matmul_gflops": peaks, "rows": rows})
    plot(rows, RESULTS / f"{args.out}.png")
    print(path)


if __name__ == "__main__":
    main()
