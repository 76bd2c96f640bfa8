"""Asynchronous sampling: environment steps on worker threads vs lock-step inside one runner.

32 conversations on the tiny model, every step delayed by 20 ms (`step_latency_ms`, a slow
tool), played in lock-step (`env_workers: 0`) and with worker threads, side by side in each
repeat, on two environments: DeepSearch (a BM25 search: the step's own work is small, so the
latency dominates, as with a remote tool) and ALFWorld (the demo's games: a pure-Python engine
whose steps hold the GIL and one process-wide lock, so threads overlap only its latency and
the engine's generation). The figure is env steps per second of wall time; each ratio is the
median over repeats of the per-repeat ratio.

Writes benchmarks/results/async_sampling.json and .png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, write  # noqa: E402

DEMO_GAMES = {"task_types": ["pick_and_place_simple", "look_at_obj_in_light"], "distractors": [0, 0]}


ENV_CONFIGS = {"deepsearch": {}, "alfworld": DEMO_GAMES}


def in_runner(env_id: str, conversations: int, latency_ms: float, workers: list[int], repeats: int) -> dict[str, Any]:
    import envs
    from empg_rllib.inference.base import SamplingParams
    from empg_rllib.inference.hf import HFEngine
    from empg_rllib.models import resolve_model
    from empg_rllib.prompting import PromptConfig
    from empg_rllib.rollout import EpisodeRequest, RolloutStats, run_episodes

    engine = HFEngine.from_pretrained(resolve_model("tiny:"), seed=0)
    config = PromptConfig(think=False, history_turns=1, list_admissible_actions=False)
    params = SamplingParams(max_new_tokens=48)
    pools: dict[int, list] = {w: [] for w in workers}  # environments made once per mode, reused

    def play(n_workers: int, repeat: int) -> RolloutStats:
        pool, stats = pools[n_workers], RolloutStats()
        requests = [EpisodeRequest(seed=1000 * repeat + i) for i in range(conversations)]
        run_episodes(
            engine, engine.tokenizer,
            lambda: pool.pop() if pool else envs.make(
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


def plot(result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["in_runner"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        speeds = run["env_steps_per_s_median"]
        labels = ["lock-step" if w == "0" else f"{w} workers" for w in speeds]
        ax.bar(labels, list(speeds.values()), color=["grey"] + ["tab:blue"] * (len(speeds) - 1))
        ax.set_ylabel("env steps / s (median)")
        ax.set_title(f"{run['env']}: {run['conversations']} conversations, +{run['step_latency_ms']:g} ms per step")
    fig.suptitle("One env runner: environment steps on worker threads vs lock-step (tiny model, CPU)")
    fig.tight_layout()
    fig.savefig(RESULTS / "async_sampling.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 4, 8, 16], help="0 first: the baseline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--envs", nargs="+", default=list(ENV_CONFIGS), choices=list(ENV_CONFIGS))
    args = parser.parse_args()
    started = time.perf_counter()
    result: dict[str, Any] = {"in_runner": []}
    for env_id in args.envs:
        print(f"{env_id}:")
        result["in_runner"].append(in_runner(env_id, args.conversations, args.latency_ms, args.workers, args.repeats))
    result["wall_s"] = time.perf_counter() - started
    for run in result["in_runner"]:
        for w, ratio in run["speedup_vs_lock_step_median"].items():
            print(f"{run['env']} env_workers={w}: {ratio:.2f}x the lock-step env steps/s (goal >= 3x)")
    path = write("async_sampling", result)
    plot(result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
