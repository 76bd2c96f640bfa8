"""Environment variables set for the duration of a block (for the processes started inside it)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping


@contextlib.contextmanager
def environ_set(values: Mapping[str, str]) -> Iterator[None]:
    """Set `values` in os.environ inside the block, then restore what was there before. Child
    processes started inside the block (vLLM's engine core, Ray Tune's trials) inherit them."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
