"""Asynchronous sampling: environment steps on worker threads vs lock-step inside one runner.

32 conversations on the tiny model, every step delayed by 20 ms (`step_latency_ms`, a slow
tool), played in lock-step (`env_workers: 0`) and with worker threads, side by side in each
repeat, on two environments: DeepSearch (a BM25 search: the step's own work is small, so the
latency dominates, as with a remote tool) and ALFWorld (the demo's games: a pure-Python engine
whose steps hold the GIL and one process-wide lock, so threads overlap only its latency and
the engine's generation). The figure is env steps per second of wall time; each ratio is the
median over repeats of the per-repeat ratio.

Across runners and learner: trained batches per hour with 2 env runners on ALFWorld (the demo's
games, the tiny model, GRPO + EMPG: every batch is trained, where DAPO would drop the untrained
model's all-failure groups), synchronous vs `async: {enabled: true}`, run one after the other
in one process, on ALFWorld as it is and with 20 ms added to each step: each figure is the
iterations after a warm-up one divided by their total time.

Iteration time (synchronous, one local runner) against group size (4, 8, 16) and max turns
(10, 20, 40): curves.

Writes benchmarks/results/async_sampling.json and .png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, write  # noqa: E402

DEMO_GAMES = {"task_types": ["pick_and_place_simple", "look_at_obj_in_light"], "distractors": [0, 0]}


ENV_CONFIGS = {"deepsearch": {}, "alfworld": DEMO_GAMES}


def in_runner(env_id: str, conversations: int, latency_ms: float, workers: list[int], repeats: int) -> dict[str, Any]:
    import empg_envs
    from empg_rllib.config.prompt import PromptConfig
    from empg_rllib.core.records import EpisodeRequest, RolloutStats
    from empg_rllib.sampling.engines.base import SamplingParams
    from empg_rllib.sampling.engines.hf import HFEngine
    from empg_rllib.sampling.rollout import run_episodes
    from empg_rllib.workflows.models import resolve_model

    engine = HFEngine.from_pretrained(resolve_model("tiny:"), seed=0)
    config = PromptConfig(think=False, history_turns=1, list_admissible_actions=False)
    params = SamplingParams(max_new_tokens=48)
    pools: dict[int, list] = {w: [] for w in workers}  # environments made once per mode, reused

    def play(n_workers: int, repeat: int) -> RolloutStats:
        pool, stats = pools[n_workers], RolloutStats()
        requests = [EpisodeRequest(seed=1000 * repeat + i) for i in range(conversations)]
        run_episodes(
            engine, engine.tokenizer,
            lambda: pool.pop() if pool else empg_envs.make(
                env_id, max_turns=10, step_latency_ms=latency_ms, **ENV_CONFIGS[env_id]
            ),
            requests, params, config, max_concurrent=conversations, stats=stats, keep_envs=pool,
            constrain_actions=True, env_workers=n_workers, seed=repeat,
        )
        return stats

    for w in workers:  # warm-up: make the environments, first torch calls
        play(w, repeat=99)
    runs: dict[int, list[dict[str, float]]] = {w: [] for w in workers}
    for r in range(repeats):
        for w in workers:
            stats = play(w, r)
            runs[w].append({
                "env_steps": stats.env_steps,
                "wall_s": stats.wall_seconds,
                "engine_s": stats.engine_seconds,
                "env_s": stats.env_seconds,
                "engine_batches": stats.engine_batches,
                "env_steps_per_s": stats.env_steps / stats.wall_seconds,
            })
            print(f"  repeat {r} env_workers={w:2d}: {runs[w][-1]['env_steps_per_s']:6.1f} env steps/s "
                  f"({stats.env_steps} steps in {stats.wall_seconds:.1f} s, {stats.engine_batches} engine batches)")
    for pool in pools.values():
        for env in pool:
            env.close()
    base = workers[0]
    return {
        "env": env_id,
        "conversations": conversations,
        "step_latency_ms": latency_ms,
        "runs": {str(w): runs[w] for w in workers},
        "env_steps_per_s_median": {str(w): statistics.median(x["env_steps_per_s"] for x in runs[w]) for w in workers},
        "speedup_vs_lock_step_median": {
            str(w): statistics.median(b["env_steps_per_s"] / a["env_steps_per_s"] for a, b in zip(runs[base], runs[w]))
            for w in workers[1:]
        },
    }


def run_iterations(overrides: dict[str, Any], iterations: int, run_dir: str) -> list[float]:
    """Wall seconds of each training iteration of the demo's ALFWorld setup with `overrides`."""
    from empg_rllib.config.loading import validate
    from empg_rllib.workflows.models import resolve_model
    from empg_rllib.workflows.training import build_algorithm

    base = {
        "env": "alfworld", "env_config": {**DEMO_GAMES, "expert": "explorer"}, "max_turns": 10, "history_turns": 1,
        "max_new_tokens": 48, "think": False, "constrain_actions": True, "list_admissible_actions": False,
        "tasks_per_batch": 4, "group_size": 4, "loss": "grpo", "lr": 1e-3, "micro_batch_size": 16,
        "checkpoint_every": 0, "iterations": iterations, "run_dir": run_dir,
    }
    algo = build_algorithm(validate({**base, **overrides}), resolve_model("tiny:"))
    times = []
    try:
        for _ in range(iterations):
            started = time.perf_counter()
            algo.train()
            times.append(time.perf_counter() - started)
    finally:
        algo.stop()
    return times


def across_runners(iterations: int, run_dir: str, latency_ms: float) -> dict[str, Any]:
    """Sync vs async with 2 env runners, on ALFWorld as it is and with `latency_ms` added to
    each step (a slow tool: the sampling phase then leaves the CPU idle, which async fills)."""
    from empg_rllib.workflows.session import ray_session

    out: dict[str, Any] = {"env_runners": 2, "iterations": iterations, "settings": []}
    with ray_session(num_cpus=3):
        for latency in (0.0, latency_ms):
            row: dict[str, Any] = {"step_latency_ms": latency}
            for mode, block in (("sync", {"enabled": False}), ("async", {"enabled": True, "max_policy_lag": 1})):
                env_config = {**DEMO_GAMES, "expert": "explorer", "step_latency_ms": latency}
                overrides = {"num_env_runners": 2, "async": block, "env_config": env_config}
                times = run_iterations(overrides, iterations, f"{run_dir}/{mode}-{latency:g}")
                # Total time, not a median: in async mode work shifts between iterations (one
                # waits for groups, the next finds them played), so single iterations alternate.
                row[mode] = {"iteration_s": times, "batches_per_hour": 3600 * (len(times) - 1) / sum(times[1:])}
                print(f"  +{latency:g} ms {mode}: {row[mode]['batches_per_hour']:.0f} trained batches/h "
                      f"(iterations {[round(t, 1) for t in times]} s)")
            row["async_vs_sync"] = row["async"]["batches_per_hour"] / row["sync"]["batches_per_hour"]
            out["settings"].append(row)
    return out


def iteration_curves(iterations: int, run_dir: str) -> dict[str, Any]:
    from empg_rllib.workflows.session import ray_session

    out: dict[str, Any] = {"group_size": {}, "max_turns": {}}
    with ray_session(num_cpus=2):
        for size in (4, 8, 16):
            times = run_iterations({"tasks_per_batch": 2, "group_size": size}, iterations, f"{run_dir}/g{size}")
            out["group_size"][str(size)] = statistics.median(times)
            print(f"  group_size {size:2d}: {out['group_size'][str(size)]:.1f} s per iteration")
        for turns in (10, 20, 40):
            times = run_iterations({"tasks_per_batch": 2, "group_size": 4, "max_turns": turns}, iterations, f"{run_dir}/t{turns}")
            out["max_turns"][str(turns)] = statistics.median(times)
            print(f"  max_turns {turns:2d}: {out['max_turns'][str(turns)]:.1f} s per iteration")
    return out


def plot(result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["in_runner"]
    extra = [k for k in ("across_runners", "curves") if k in result]
    fig, axes = plt.subplots(1, len(runs) + len(extra), figsize=(5 * (len(runs) + len(extra)), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        speeds = run["env_steps_per_s_median"]
        labels = ["lock-step" if w == "0" else f"{w} workers" for w in speeds]
        ax.bar(labels, list(speeds.values()), color=["grey"] + ["tab:blue"] * (len(speeds) - 1))
        ax.set_ylabel("env steps / s (median)")
        ax.set_title(f"{run['env']}: {run['conversations']} conversations, +{run['step_latency_ms']:g} ms per step")
    rest = list(axes[0][len(runs):])
    if "across_runners" in result:
        ax, across = rest.pop(0), result["across_runners"]
        for i, row in enumerate(across["settings"]):
            bars = ax.bar([3 * i, 3 * i + 1], [row["sync"]["batches_per_hour"], row["async"]["batches_per_hour"]],
                          color=["grey", "tab:blue"], label=["sync", "async"] if i == 0 else None)
            ax.bar_label(bars, labels=["", f"{row['async_vs_sync']:.2f}x"])
        ax.set_xticks([3 * i + 0.5 for i in range(len(across["settings"]))],
                      [f"+{row['step_latency_ms']:g} ms/step" for row in across["settings"]])
        ax.set_ylabel("trained batches / hour")
        ax.set_title(f"ALFWorld, {across['env_runners']} env runners: sync vs async")
        ax.legend()
    if "curves" in result:
        ax, curves = rest.pop(0), result["curves"]
        for name, points in curves.items():
            ax.plot([int(x) for x in points], list(points.values()), marker="o", label=name)
        ax.set_xlabel("group size / max turns")
        ax.set_ylabel("s per iteration (median)")
        ax.set_title("Iteration time (2 tasks per batch, sync)")
        ax.legend()
    fig.suptitle("Asynchronous sampling on a CPU (tiny model)")
    fig.tight_layout()
    fig.savefig(RESULTS / "async_sampling.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 4, 8, 16], help="0 first: the baseline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--envs", nargs="+", default=list(ENV_CONFIGS), choices=list(ENV_CONFIGS))
    parser.add_argument("--iterations", type=int, default=7, help="per arm of the sync/async comparison")
    parser.add_argument("--curve-iterations", type=int, default=2)
    parser.add_argument("--parts", nargs="+", default=["in_runner", "across_runners", "curves"])
    args = parser.parse_args()
    started = time.perf_counter()
    result: dict[str, Any] = {"in_runner": []}
    for env_id in args.envs if "in_runner" in args.parts else []:
        print(f"{env_id}:")
        result["in_runner"].append(in_runner(env_id, args.conversations, args.latency_ms, args.workers, args.repeats))
    with tempfile.TemporaryDirectory() as run_dir:
        if "across_runners" in args.parts:
            print("sync vs async, 2 env runners, ALFWorld:")
            result["across_runners"] = across_runners(args.iterations, run_dir, args.latency_ms)
            for row in result["across_runners"]["settings"]:
                print(f"+{row['step_latency_ms']:g} ms: async {row['async_vs_sync']:.2f}x the synchronous batches/h "
                      "(goal >= 1.5x)")
        if "curves" in args.parts:
            print("iteration time:")
            result["curves"] = iteration_curves(args.curve_iterations, run_dir)
    result["wall_s"] = time.perf_counter() - started
    for run in result["in_runner"]:
        for w, ratio in run["speedup_vs_lock_step_median"].items():
            print(f"{run['env']} env_workers={w}: {ratio:.2f}x the lock-step env steps/s (goal >= 3x)")
    previous = RESULTS / "async_sampling.json"
    if set(args.parts) != {"in_runner", "across_runners", "curves"} and previous.exists():
        # A partial rerun keeps the other parts' figures from the last full run.
        kept = {k: v for k, v in json.loads(previous.read_text()).items() if k not in ("machine", "wall_s")}
        result = {**kept, **{k: v for k, v in result.items() if v or k == "wall_s"}}
    path = write("async_sampling", result)
    plot(result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
