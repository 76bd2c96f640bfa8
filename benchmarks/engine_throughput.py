"""HF engine generated tokens/s for the tiny and small offline models at batch 1, 8 and 32.

Writes benchmarks/results/engine_throughput.json and .png. Each point is the median of
`--repeats` timed runs after one warm-up run; prompts are real ALFWorld-style agent prompts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, write  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from empg_rllib import models
    from empg_rllib.inference.base import SamplingParams
    from empg_rllib.inference.hf import HFEngine
    from empg_rllib.prompting import build_prompt_ids

    hf_logging.disable_progress_bar()
    rows = []
    for size in args.sizes:
        tokenizer, model = models.load(f"{size}:")
        engine = HFEngine(model, tokenizer, seed=0)
        params_count = sum(p.numel() for p in model.parameters())
        for batch in args.batches:
            prompts = [
                build_prompt_ids(
                    tokenizer,
                    f"put a mug {i} in the fridge",
                    "You are in the middle of a room. You see a fridge 1, a desk 1 and a cabinet 2.",
                    admissible_actions=["go to fridge 1", "go to desk 1", "look", "inventory"],
                )
                for i in range(batch)
            ]
            params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, stop=(), seed=0)
            engine.generate(prompts, params)  # warm-up
            rates = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                outs = engine.generate(prompts, params)
                elapsed = time.perf_counter() - start
                rates.append(sum(len(o.token_ids) for o in outs) / elapsed)
            row = {
                "model": size,
                "parameters": params_count,
                "batch": batch,
                "prompt_tokens": statistics.median(len(p) for p in prompts),
                "new_tokens": args.new_tokens,
                "tokens_per_s_median": statistics.median(rates),
                "tokens_per_s_runs": rates,
            }
            rows.append(row)
            print(f"{size:5s} batch {batch:3d}: {row['tokens_per_s_median']:8.1f} tokens/s (runs {[round(r) for r in rates]})")
    path = write("engine_throughput", {"engine": "hf", "dtype": "float32", "results": rows})
    plot(rows)
    print(f"wrote {path}")


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for size in dict.fromkeys(r["model"] for r in rows):
        pts = [r for r in rows if r["model"] == size]
        ax.plot([r["batch"] for r in pts], [r["tokens_per_s_median"] for r in pts], marker="o", label=size)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("generated tokens/s (median)")
    ax.set_title("HF engine throughput, fp32 CPU")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "engine_throughput.png", dpi=120)


if __name__ == "__main__":
    main()
