"""Environments over HTTP: env steps/s through `empg serve-env` against the same environment in
the process, per environment family.

Each repeat plays the same episodes both ways, in alternating order: seeded tasks, actions drawn
by a seeded generator from the admissible actions (every family offers a list: DeepSearch with
`action_choices`, WebShop with `query_choices`), so both sides step the same trajectories, which
the benchmark checks observation by observation. The server is `empg serve-env` in its own
process, on localhost, as a user runs it; the client is the `http` environment the runners use
(one HTTP request per call, no connection reuse). Steps/s counts step calls over the time spent
in reset and step: making and closing an environment are left out on both sides, since the runners
keep theirs, and so does the server (an environment whose episode ended waits for the next one);
each ratio is the median over repeats of the per-repeat ratio.

Writes benchmarks/results/remote_env.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import paired_bars, write  # noqa: E402

FAMILIES: dict[str, dict[str, Any]] = {
    "deepsearch": {"action_choices": True},
    "webshop": {"query_choices": True},
    "alfworld": {"task_types": ["pick_and_place_simple", "look_at_obj_in_light"], "distractors": [0, 0]},
    "twx/coin": {},
}


class Served:
    """`empg serve-env ENV_ID` in its own process, on a free localhost port, with a fresh token."""

    def __init__(self, env_id: str, env_config: dict[str, Any]) -> None:
        from empg_envs.remote import TOKEN_ENV

        self.token = secrets.token_urlsafe(24)
        os.environ[TOKEN_ENV] = self.token  # the client reads it from its own environment
        sets = [arg for key, value in env_config.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "empg_rllib.cli", "serve-env", env_id, "--port", "0", *sets],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ},
        )
        first = self.process.stdout.readline()
        if not first.startswith("serving "):
            self.close()
            raise RuntimeError(f"empg serve-env {env_id} did not start: {first}{self.process.stdout.read()}")
        self.url = first.split(" at ", 1)[1].split("/v1/", 1)[0]

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def play(env: Any, seeds: range, max_turns: int) -> tuple[int, float, list[str]]:
    """(steps, seconds in reset/step, every observation) over one episode per seed."""
    import numpy as np

    steps, seconds, seen = 0, 0.0, []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        observation, info = env.reset(seed=seed)
        seconds += time.perf_counter() - start
        seen.append(observation)
        for _ in range(max_turns):
            action = str(rng.choice(info["admissible_actions"]))
            start = time.perf_counter()
            observation, _, terminated, truncated, info = env.step(action)
            seconds += time.perf_counter() - start
            steps += 1
            seen.append(observation)
            if terminated or truncated:
                break
    env.close()
    return steps, seconds, seen


def measure(env_id: str, env_config: dict[str, Any], episodes: int, max_turns: int, repeats: int) -> dict[str, Any]:
    import empg_envs

    served = Served(env_id, env_config)
    rates: dict[str, list[float]] = {"in_process": [], "served": []}
    ratios = []
    try:
        makers = {
            "in_process": lambda: empg_envs.make(env_id, max_turns=max_turns, **env_config),
            "served": lambda: empg_envs.make("http", url=served.url, max_turns=max_turns),
        }
        play(makers["in_process"](), range(1), max_turns)  # warm both: JVM, indexes, first connection
        play(makers["served"](), range(1), max_turns)
        for repeat in range(repeats):
            order = ("in_process", "served") if repeat % 2 == 0 else ("served", "in_process")
            runs = {side: play(makers[side](), range(episodes), max_turns) for side in order}
            if runs["served"][2] != runs["in_process"][2]:
                raise AssertionError(f"{env_id}: the served environment played other observations than in process")
            for side, (steps, seconds, _) in runs.items():
                rates[side].append(steps / seconds)
            ratios.append(rates["served"][-1] / rates["in_process"][-1])
    finally:
        served.close()
    row = {
        "env": env_id, "env_config": env_config, "episodes": episodes, "max_turns": max_turns, "repeats": repeats,
        "in_process_steps_per_s": statistics.median(rates["in_process"]),
        "served_steps_per_s": statistics.median(rates["served"]),
        "served_over_in_process": statistics.median(ratios),
        "overhead_ms_per_step": 1000 * (1 / statistics.median(rates["served"]) - 1 / statistics.median(rates["in_process"])),
        "runs": rates,
    }
    print(f"{env_id:12s} in process {row['in_process_steps_per_s']:8.1f} steps/s, served "
          f"{row['served_steps_per_s']:8.1f} ({row['served_over_in_process']:.2f}x, "
          f"+{row['overhead_ms_per_step']:.2f} ms a step)", flush=True)
    return row


def plot(rows: list[dict[str, Any]]) -> None:
    paired_bars(
        "remote_env", [r["env"] for r in rows],
        {"in process": [r["in_process_steps_per_s"] for r in rows],
         "through empg serve-env (HTTP)": [r["served_steps_per_s"] for r in rows]},
        [f"{r['served_over_in_process']:.2f}x" for r in rows],
        "env steps/s (median over repeats, log scale)",
        "An environment served over HTTP against the same one in process", log=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="*", default=list(FAMILIES))
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--max-turns", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    unknown = sorted(set(args.envs) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"--envs: unknown {unknown}; choose from {sorted(FAMILIES)}")
    rows = [measure(env, FAMILIES[env], args.episodes, args.max_turns, args.repeats) for env in args.envs]
    path = write("remote_env", {"rows": rows})
    plot(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
