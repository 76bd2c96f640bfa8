"""Shared output handling for benchmarks: JSON + PNG under benchmarks/results/."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def cpu() -> dict[str, Any]:
    """The CPU's model name and the features that decide the figures: AVX-512, native bf16."""
    from empg_rllib.core.precision import cpu_bf16_flags

    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = text.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return {"model": model or platform.processor() or "unknown", "avx512f": "avx512f" in flags,
            "bf16": list(cpu_bf16_flags())}


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpu": cpu(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def matmul_gflops(dtype: str = "float32", size: int = 2048, repeats: int = 10) -> float:
    """Square matmul GFLOP/s of this host in `dtype` with torch's threads: the ceiling that a
    model's compute is held to (median of `repeats` after a warm-up)."""
    import torch

    a, b = (torch.randn(size, size).to(getattr(torch, dtype)) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    gflops = 2 * size**3 / statistics.median(times) / 1e9
    print(f"{dtype} matmul {size}^3 ({torch.get_num_threads()} threads): {gflops:.1f} GFLOP/s", flush=True)
    return gflops


def flops_per_token(config: Any, context: float, head: bool = True) -> float:
    """Forward FLOPs of one token: 2 per weight of every matmul (attention projections, MLP,
    and with `head` the LM head) plus attention over `context` earlier positions."""
    h, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = 2 * (h * h + 2 * h * kv + h * h) + 2 * 3 * h * config.intermediate_size
    attention = 2 * 2 * context * h
    return layers * (per_layer + attention) + (2 * h * config.vocab_size if head else 0)


def labelled_overrides(spec: str) -> tuple[str, list[str]]:
    """"label:KEY=VALUE,KEY=VALUE" -> (label, ["KEY=VALUE", ...]): a benchmark's variant."""
    label, _, sets = spec.partition(":")
    return label, [item for item in sets.split(",") if item]


def write(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    os.replace(tmp, path)
    return path


def random_rows(
    rows: int, vocab: int, seed: int = 0, prompt: tuple[int, int] = (3, 12), response: tuple[int, int] = (1, 7)
) -> dict[str, Any]:
    """Random token rows in the learner's layout: prompt and response lengths drawn from
    [low, high), left-padded, responses right-aligned, ids >= 5."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prompts = rng.integers(*prompt, rows)
    responses = rng.integers(*response, rows)
    width = int((prompts + responses).max())
    ids = np.zeros((rows, width), dtype=np.int64)
    mask = np.zeros((rows, width), dtype=np.int64)
    resp = np.zeros((rows, width - 1), dtype=np.float32)
    for r in range(rows):
        n = prompts[r] + responses[r]
        ids[r, width - n :] = rng.integers(5, vocab, n)
        mask[r, width - n :] = 1
        resp[r, width - 1 - responses[r] :] = 1.0
    return {"input_ids": ids, "attention_mask": mask, "resp_mask": resp}


def paired_bars(
    name: str, labels: list[str], pairs: dict[str, list[float]], notes: list[str], xlabel: str, title: str,
    log: bool = False,
) -> Path:
    """Horizontal bars, two per label (`pairs`: legend -> one value per label), the second
    annotated with `notes`; saved as benchmarks/results/<name>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    (first, a), (second, b) = pairs.items()
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.9 * len(labels)))
    y = np.arange(len(labels))
    ax.barh(y + 0.2, a, height=0.4, label=first)
    ax.barh(y - 0.2, b, height=0.4, label=second)
    for i, note in enumerate(notes):
        ax.text(b[i], i - 0.2, f" {note}", va="center", fontsize="small")
    ax.set_yticks(y, labels)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
