"""Env workers: lock-step vs threads vs processes, per environment family.

32 conversations on the offline tiny model inside one sampling call (`run_episodes`), env steps
per second of wall time, for each environment family and for a pure-Python environment that
burns a fixed amount of CPU per step (`BusyEnv`, standing for a simulator the GIL holds back),
each with and without 20 ms of latency added to every step (`step_latency_ms`, a slow tool that
releases the GIL). The three modes run side by side in each repeat: lock-step (`env_workers: 0`),
`env_workers` threads and `env_workers` processes (`env_worker_mode: process`); each ratio is the
median over repeats of the per-repeat ratio.

Writes benchmarks/results/env_workers.json and .png.
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

BUSY = "bench-busy"
FAMILIES = {
    "deepsearch": {},
    "webshop": {},
    "alfworld": {"task_types": ["pick_and_place_simple", "look_at_obj_in_light"], "distractors": [0, 0]},
    BUSY: {"cpu_ms": 10.0},
}
MODES = ("lock-step", "threads", "processes")


def run(env_id: str, env_config: dict, latency_ms: float, workers: int, conversations: int, max_turns: int,
        repeats: int) -> dict[str, Any]:
    import empg_envs
    from empg_rllib.config.prompt import PromptConfig
    from empg_rllib.core.records import EpisodeRequest, RolloutStats
    from empg_rllib.sampling.engines.base import SamplingParams
    from empg_rllib.sampling.engines.hf import HFEngine
    from empg_rllib.sampling.env_processes import EnvProcesses
    from empg_rllib.sampling.rollout import run_episodes
    from empg_rllib.workflows.models import resolve_model

    engine = HFEngine.from_pretrained(resolve_model("tiny:"), seed=0)
    prompt = PromptConfig(think=False, history_turns=1, list_admissible_actions=False)
    config = {**env_config, "step_latency_ms": latency_ms, "max_turns": max_turns}
    processes = EnvProcesses(workers, env_id, config)
    pools: dict[str, list] = {mode: [] for mode in MODES}  # environments made once per mode, reused
    makers = {
        "lock-step": lambda: empg_envs.make(env_id, **config),
        "threads": lambda: empg_envs.make(env_id, **config),
        "processes": processes.make,
    }
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    try:
        for repeat in range(repeats + 1):  # the first round makes the environments: not counted
            for mode in MODES:
                pool, stats = pools[mode], RolloutStats()
                requests = [EpisodeRequest(seed=1000 * repeat + i) for i in range(conversations)]
                started = time.perf_counter()
                run_episodes(engine, engine.tokenizer, lambda m=mode, p=pool: p.pop() if p else makers[m](),
                             requests, SamplingParams(max_new_tokens=24), prompt, max_concurrent=conversations,
                             stats=stats, keep_envs=pool, env_id=env_id, seed=repeat,
                             env_workers=0 if mode == "lock-step" else workers)
                if repeat:
                    rates[mode].append(stats.env_steps / (time.perf_counter() - started))
    finally:
        for pool in pools.values():
            for env in pool:
                env.close()
        processes.close()
    row: dict[str, Any] = {"env": env_id, "latency_ms": latency_ms, "workers": workers,
                           "env_steps_per_s": {m: statistics.median(r) for m, r in rates.items()},
                           "runs": rates}
    for mode in ("threads", "processes"):
        row[f"{mode}_vs_lock_step"] = statistics.median(a / b for a, b in zip(rates[mode], rates["lock-step"]))
    row["processes_vs_threads"] = statistics.median(a / b for a, b in zip(rates["processes"], rates["threads"]))
    print(f"{env_id:12s} latency {latency_ms:4.0f} ms: " + "  ".join(
        f"{m} {row['env_steps_per_s'][m]:6.1f}" for m in MODES) + f"  env steps/s; processes/threads "
        f"{row['processes_vs_threads']:.2f}x", flush=True)
    return row


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, latency in zip(fig.subplots(1, 2), sorted({r["latency_ms"] for r in rows})):
        subset = [r for r in rows if r["latency_ms"] == latency]
        width = 0.8 / len(MODES)
        for k, mode in enumerate(MODES):
            xs = [i - 0.4 + width * (k + 0.5) for i in range(len(subset))]
            ax.bar(xs, [r["env_steps_per_s"][mode] for r in subset], width, label=mode)
        ax.set_xticks(range(len(subset)), [r["env"] for r in subset])
        ax.set_ylabel("env steps / s (32 conversations, tiny model)")
        ax.set_title(f"{latency:.0f} ms added to each step")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Env workers: lock-step vs {rows[0]['workers']} threads vs {rows[0]['workers']} processes")
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=list(FAMILIES))
    parser.add_argument("--latencies", nargs="+", type=float, default=[0.0, 20.0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--max-turns", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import empg_envs

    empg_envs.register(BUSY, "_busy_env:BusyEnv")
    rows = [run(env_id, FAMILIES.get(env_id, {}), latency, args.workers, args.conversations, args.max_turns,
                args.repeats) for env_id in args.envs for latency in args.latencies]
    path = write("env_workers", {"settings": vars(args), "rows": rows})
    plot(rows, RESULTS / "env_workers.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
