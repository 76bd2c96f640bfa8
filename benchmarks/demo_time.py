"""Where `make demo`'s time goes: the shipped demo run end to end (`empg demo`, a fresh run
directory), its wall time split by part from its summary (workflows/demo.time_split): the
model, SFT (collecting, training, held-out check), each evaluation split, RL's iterations
(sampling, scoring, update, weight sync, the rest) and RL outside its iterations.

    python benchmarks/demo_time.py [--variant "label:KEY=VALUE,KEY=VALUE" ...]

Each variant is a whole demo with those overrides (default: the demo as it ships); they run one
after another on the same machine. Writes benchmarks/results/demo_time.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, cpu, labelled_overrides, write  # noqa: E402

#: The demo's goal on a 2-core machine of the class it is measured on.
GOAL_S = 12 * 60


def run(label: str, overrides: list[str], run_dir: str) -> dict[str, Any]:
    sets = [f"--set={item}" for item in [f"run_dir={run_dir}", *overrides]]
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "empg"), "demo", *sets], check=True)
    wall = time.perf_counter() - started
    summary = json.loads((Path(run_dir) / "demo" / "demo_summary.json").read_text())
    return {
        "label": label,
        "overrides": overrides,
        "process_s": wall,
        "demo_s": summary["wall_s"],
        "time_s": summary["time_s"],
        "success": {
            phase: {split: r["success_rate"] for split, r in summary[phase].items()} for phase in ("before_rl", "after_rl")
        },
    }


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One bar segment per evaluation (its splits together), per SFT part, per RL part.
    groups: dict[str, list[float]] = {}
    for i, row in enumerate(rows):
        for part, seconds in row["time_s"].items():
            group = part if part.startswith("rl/") else part.split("/")[0]
            groups.setdefault(group, [0.0] * len(rows))[i] += seconds
    fig, ax = plt.subplots(figsize=(9, 1.8 + 0.7 * len(rows)))
    left = [0.0] * len(rows)
    colors = plt.get_cmap("tab20").colors
    for k, (group, values) in enumerate(groups.items()):
        ax.barh([r["label"] for r in rows], values, left=left, label=group, color=colors[k % len(colors)])
        left = [a + b for a, b in zip(left, values)]
    ax.axvline(GOAL_S, color="black", linestyle="--", linewidth=1, label="goal 12 min")
    ax.set_xlabel("seconds inside `empg demo`")
    ax.set_title(f"make demo's time by part ({cpu()['model']})")
    ax.legend(fontsize="x-small", ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], help='"label:KEY=VALUE,KEY=VALUE" (repeatable)')
    parser.add_argument("--out", default="demo_time", help="results name: <out>.json and <out>.png")
    args = parser.parse_args()
    rows = []
    for label, overrides in [labelled_overrides(v) for v in args.variant] or [("shipped", [])]:
        with tempfile.TemporaryDirectory(prefix="empg-demo-time-") as run_dir:
            row = run(label, overrides, run_dir)
        print(json.dumps(row, indent=1), flush=True)
        rows.append(row)
    path = write(args.out, {"goal_s": GOAL_S, "rows": rows})
    plot(rows, RESULTS / f"{args.out}.png")
    print(path)


if __name__ == "__main__":
    main()
