"""What the processes started inside a block inherit: environment variables, and where their
standard output and error go."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path


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


@contextlib.contextmanager
def errors_to(path: str | os.PathLike) -> Iterator[None]:
    """Inside the block, file descriptor 2 (standard error) writes to `path` (appended): for this
    process until the block ends, and for good for every child process started inside it (what
    vLLM's engine core prints, at exit included). Standard output is left alone: a live
    progress display may be writing to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(2)
    try:
        os.dup2(target, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(target)
