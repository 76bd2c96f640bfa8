"""Which floating-point type a configured `bfloat16` really gets on this host.

bf16 pays off only where the hardware computes it natively: CUDA GPUs that support it, and CPUs
with AVX-512 BF16 or AMX. Elsewhere (an AVX2-only CPU, for one) torch emulates it and a bf16
matmul runs about 60x slower than fp32, so a configured bf16 falls back to fp32 there, with one
logged line saying so. The same rule serves the learner, SFT and the HF engine.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """The CPU features among AVX-512 BF16 and AMX-BF16 that this host has (empty: none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    found = tuple(f for f in _CPU_BF16_FLAGS if f in flags)
    if not found and not text:
        # No /proc/cpuinfo (macOS, say): ask torch's own dispatcher probes.
        probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
        found = tuple(f for f, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)())
    return found


def bf16_native(device: str | torch.device = "cpu") -> bool:
    """Whether `device` computes bf16 matmuls in hardware."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(cpu_bf16_flags())
    return False


_announced: set[tuple[str, str]] = set()


def resolve_dtype(requested: str, device: str | torch.device = "cpu", what: str = "compute") -> torch.dtype:
    """The dtype to compute in: `requested` ("float32" or "bfloat16"), except bf16 on a device
    without native bf16, which falls back to fp32 (logged once per process and purpose)."""
    if requested == "float32":
        return torch.float32
    if requested != "bfloat16":
        raise ValueError(f"unsupported dtype {requested!r}; expected 'float32' or 'bfloat16'")
    device = torch.device(device)
    if bf16_native(device):
        return torch.bfloat16
    key = (device.type, what)
    if key not in _announced:
        _announced.add(key)
        logger.warning(
            "%s: bfloat16 requested but %s has no native bf16 (needs CUDA bf16, AVX-512 BF16 or AMX);"
            " using float32",
            what,
            "this CPU" if device.type == "cpu" else device,
        )
    return torch.float32


def autocast(dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.autocast:
    """bf16 autocast for a forward pass when `dtype` is bf16, disabled otherwise. The weights
    (the fp32 master copy) and the optimizer state stay fp32 either way."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

