"""Atomic directory writes keep the old content when a write fails midway."""

from __future__ import annotations

import pytest

from empg_rllib.util.fileio import atomic_directory


def test_replaces_existing_directory(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as staging:
        (staging / "a").write_text("1")
    with atomic_directory(target) as staging:
        (staging / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging or old copies left


def test_failed_write_keeps_previous_content(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as staging:
        (staging / "good").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "partial").write_text("x")
            raise RuntimeError("crash while writing")
    assert sorted(p.name for p in target.iterdir()) == ["good"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
