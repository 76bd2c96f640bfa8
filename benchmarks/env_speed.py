"""Environment speed and expert success: resets/s, steps/s, and expert success per split.

Writes benchmarks/results/env_speed.json and .png. Steps are timed while the expert plays, so
the figure includes the engine's own work per step (planner, BM25 search, JVM call); the expert's
own planning time is timed separately and left out of steps/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, write  # noqa: E402

DEFAULT_ENVS = ["alfworld", "webshop", "deepsearch", "twx/cookingworld", "twx/twc", "twx/coin", "twx/mapreader"]
SPLITS = ("train", "eval_seen", "eval_unseen")


def measure(env_id: str, episodes: int) -> dict:
    import empg_envs

    row: dict = {"env": env_id, "splits": {}}
    reset_times, step_times = [], []
    for split in SPLITS:
        start = time.perf_counter()
        env = empg_envs.make(env_id, split=split)
        make_s = time.perf_counter() - start
        wins: dict[str, list[bool]] = defaultdict(list)
        turns = []
        for seed in range(episodes):
            t0 = time.perf_counter()
            _, info = env.reset(seed=seed)
            reset_times.append(time.perf_counter() - t0)
            done, n = False, 0
            while not done:
                action = empg_envs.expert_action(env)
                t0 = time.perf_counter()
                _, _, terminated, truncated, info = env.step(action)
                step_times.append(time.perf_counter() - t0)
                done, n = terminated or truncated, n + 1
            wins[info["task_type"]].append(bool(info["won"]))
            turns.append(n)
        env.close()
        every = [w for ws in wins.values() for w in ws]
        row["splits"][split] = {
            "episodes": len(every),
            "expert_success": sum(every) / len(every),
            "expert_success_by_type": {t: sum(w) / len(w) for t, w in sorted(wins.items())},
            "mean_turns": statistics.mean(turns),
            "make_s": make_s,
        }
        print(f"{env_id:18s} {split:11s} expert {sum(every)}/{len(every)}  mean turns {statistics.mean(turns):.1f}")
    row["resets_per_s"] = 1 / statistics.median(reset_times)
    row["steps_per_s"] = 1 / statistics.median(step_times)
    row["reset_ms_median"] = 1000 * statistics.median(reset_times)
    row["step_ms_median"] = 1000 * statistics.median(step_times)
    print(f"{env_id:18s} resets/s {row['resets_per_s']:.1f}  steps/s {row['steps_per_s']:.1f}")
    return row


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["env"] for r in rows]
    axes[0].barh(names, [r["steps_per_s"] for r in rows], label="steps/s")
    axes[0].barh(names, [r["resets_per_s"] for r in rows], alpha=0.6, label="resets/s")
    axes[0].set_xscale("log")
    axes[0].set_title("median speed (log scale)")
    axes[0].legend()
    width = 0.25
    for i, split in enumerate(SPLITS):
        axes[1].bar(
            [j + i * width for j in range(len(rows))],
            [100 * r["splits"][split]["expert_success"] for r in rows],
            width,
            label=split,
        )
    axes[1].set_xticks([j + width for j in range(len(rows))], names, rotation=30, ha="right")
    axes[1].set_ylim(90, 100.5)
    axes[1].set_title("expert success % per split")
    axes[1].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / "env_speed.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--envs", nargs="+", default=DEFAULT_ENVS)
    parser.add_argument("--episodes", type=int, default=30, help="expert episodes per split")
    args = parser.parse_args()
    rows = [measure(env_id, args.episodes) for env_id in args.envs]
    path = write("env_speed", {"episodes_per_split": args.episodes, "results": rows})
    plot(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
