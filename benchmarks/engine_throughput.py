"""The inference engines side by side: HF vs vLLM on the tiny and small offline models.

Writes benchmarks/results/engine_throughput.json and .png. Every part runs in this one process,
both engines on the same prompts, each figure the median of `--repeats` timed runs after a
warm-up:
- generated tokens/s at batch 8, 32 and 64 (64 new tokens forced, real ALFWorld prompts);
- the share of this machine's fp32 roofline vLLM reaches: FLOPs per generated token from the
  model's shapes, times tokens/s, over the matmul GFLOP/s measured here in the same run;
- weight sync learner -> engine (the state dict in, the engine serving it: what a runner does);
- an env runner's whole turn loop on ALFWorld against the engine alone on the same prompts.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, flops_per_token, matmul_gflops, write  # noqa: E402


def agent_prompts(tokenizer: Any, batch: int) -> list[list[int]]:
    from empg_rllib.sampling.prompting import build_prompt_ids

    return [
        build_prompt_ids(
            tokenizer,
            f"put a mug {i} in the fridge",
            "You are in the middle of a room. You see a fridge 1, a desk 1 and a cabinet 2.",
            admissible_actions=["go to fridge 1", "go to desk 1", "look", "inventory"],
        )
        for i in range(batch)
    ]


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


class Recording:
    """An engine that records each batch it generates (to replay the same prompts alone)."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.calls = engine, []
        self.weights_version = 0

    def generate(self, prompts, params, choices=None, seeds=None):
        self.calls.append((list(prompts), params, choices, seeds))
        return self.engine.generate(prompts, params, choices, seeds=seeds)


def runner_overhead(engine: Any, tokenizer: Any, episodes: int, repeats: int, env_workers: int) -> dict[str, Any]:
    """ALFWorld turns through `run_episodes` (prompts, parsing, env steps on `env_workers`
    threads, or in lock-step for 0) vs the engine alone generating the same batches of the same
    prompts."""
    import empg_envs
    from empg_rllib.core.records import EpisodeRequest, RolloutStats
    from empg_rllib.sampling.engines.base import SamplingParams
    from empg_rllib.sampling.rollout import run_episodes

    params = SamplingParams(max_new_tokens=32, temperature=1.0)
    full, alone = [], []
    for r in range(repeats):
        recorder, stats = Recording(engine), RolloutStats()
        requests = [EpisodeRequest(seed=1000 * r + i) for i in range(episodes)]
        start = time.perf_counter()
        run_episodes(
            recorder, tokenizer, lambda: empg_envs.make("alfworld", split="train", max_turns=10), requests, params,
            max_concurrent=episodes, stats=stats, env_workers=env_workers,
        )
        full.append(time.perf_counter() - start)
        start = time.perf_counter()
        for prompts, call_params, choices, seeds in recorder.calls:
            engine.generate(prompts, call_params, choices, seeds=seeds)
        alone.append(time.perf_counter() - start)
    ratio = statistics.median(f / a for f, a in zip(full, alone))
    return {
        "episodes": episodes,
        "env_workers": env_workers,
        "env_steps_last_run": stats.env_steps,
        "turn_loop_s": full,
        "engine_alone_s": alone,
        "overhead_median": ratio - 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 32, 64])
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=16, help="ALFWorld episodes for the runner overhead")
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from empg_rllib.core.precision import cpu_bf16_flags
    from empg_rllib.sampling.engines.base import SamplingParams
    from empg_rllib.sampling.engines.hf import HFEngine
    from empg_rllib.sampling.engines.vllm import VLLMEngine, cpu_cores_for
    from empg_rllib.workflows import models

    hf_logging.disable_progress_bar()
    gflops = matmul_gflops("float32", size=1024)
    rows, syncs, overhead = [], [], {}
    for size in args.sizes:
        path = models.resolve_model(f"{size}:")
        tokenizer, model = models.load(f"{size}:")
        params_count = sum(p.numel() for p in model.parameters())
        for name in args.engines:
            started = time.perf_counter()
            engine = (
                HFEngine(model, tokenizer, seed=0)
                if name == "hf"
                # The cores a local env runner's engine gets: all of them, as HF's torch threads.
                else VLLMEngine(path, tokenizer, seed=0, cpu_cores=cpu_cores_for(0, 0))
            )
            init_s = time.perf_counter() - started
            print(f"{size} {name}: engine ready in {init_s:.1f} s")
            for batch in args.batches:
                prompts = agent_prompts(tokenizer, batch)
                params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, stop=(), seed=0)
                counts = []

                def run(engine=engine, prompts=prompts, params=params, counts=counts):
                    counts.append(sum(len(o.token_ids) for o in engine.generate(prompts, params)))

                times = timed(run, args.repeats)
                rates = [c / t for c, t in zip(counts[1:], times)]
                context = statistics.median(len(p) for p in prompts) + args.new_tokens / 2
                row = {
                    "engine": name,
                    "model": size,
                    "parameters": params_count,
                    "batch": batch,
                    "engine_init_s": init_s,
                    "prompt_tokens": statistics.median(len(p) for p in prompts),
                    "new_tokens": args.new_tokens,
                    "tokens_per_s_median": statistics.median(rates),
                    "tokens_per_s_runs": rates,
                    "roofline_share": statistics.median(rates) * flops_per_token(model.config, context) / (gflops * 1e9),
                }
                rows.append(row)
                print(
                    f"{size:5s} {name:4s} batch {batch:3d}: {row['tokens_per_s_median']:8.1f} tokens/s "
                    f"({100 * row['roofline_share']:.1f}% of the fp32 roofline; runs {[round(r) for r in rates]})"
                )
            if name == "vllm":
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                times = timed(lambda engine=engine: engine.update_weights(state), args.repeats + 2)
                mib = sum(v.numel() * v.element_size() for v in state.values()) / 2**20
                syncs.append({"model": size, "mib": mib, "seconds_runs": times, "seconds_median": statistics.median(times)})
                print(f"{size} weight sync to vLLM ({mib:.1f} MiB): median {statistics.median(times):.3f} s")
                if size == args.sizes[0]:
                    for workers in (0, 4):
                        overhead[f"env_workers_{workers}"] = found = runner_overhead(
                            engine, tokenizer, args.episodes, args.repeats, workers
                        )
                        print(
                            f"{size} ALFWorld turn loop (env_workers={workers}) vs engine alone: "
                            f"overhead {100 * found['overhead_median']:.1f}%"
                        )
                engine.close()
            del engine
            gc.collect()

    def speedup(size: str, batch: int) -> float | None:
        by = {r["engine"]: r["tokens_per_s_median"] for r in rows if r["model"] == size and r["batch"] == batch}
        return by["vllm"] / by["hf"] if {"vllm", "hf"} <= by.keys() else None

    ratios = {f"{s}_batch{b}": speedup(s, b) for s in args.sizes for b in args.batches}
    for key, value in ratios.items():
        if value is not None:
            print(f"vLLM / HF tokens/s, {key}: {value:.2f}x")
    path = write(
        "engine_throughput",
        {
            "dtype": "float32",
            "cpu_bf16_flags": list(cpu_bf16_flags()),
            "matmul_gflops_fp32": gflops,
            "results": rows,
            "vllm_over_hf": ratios,
            "weight_sync": syncs,
            "runner_overhead_alfworld": overhead,
        },
    )
    plot(rows, syncs)
    print(f"wrote {path}")


def plot(rows: list[dict], syncs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for key in dict.fromkeys((r["model"], r["engine"]) for r in rows):
        pts = [r for r in rows if (r["model"], r["engine"]) == key]
        ax.plot([r["batch"] for r in pts], [r["tokens_per_s_median"] for r in pts], marker="o", label=" ".join(key))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel("generated tokens/s (median)")
    ax.set_title("Engine throughput, fp32 on this CPU")
    ax.legend()
    ax.grid(alpha=0.3)
    bx.bar([s["model"] for s in syncs], [s["seconds_median"] for s in syncs])
    bx.set_ylabel("seconds (median)")
    bx.set_title("Weight sync into vLLM (until served)")
    fig.tight_layout()
    fig.savefig(RESULTS / "engine_throughput.png", dpi=120)


if __name__ == "__main__":
    main()
