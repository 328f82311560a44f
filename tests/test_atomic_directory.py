"""model_dir.atomic_directory: the one way a directory is written whole (model directories, Hugging Face
exports): replaced complete or not at all, fsynced, nothing left beside it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jaxclf import model_dir


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir())


def test_replaces_the_previous_directory_whole(tmp_path):
    target = tmp_path / "out" / "model"  # the parent is created too
    with model_dir.atomic_directory(target) as tmp:
        assert tmp.parent == target.parent and not target.exists()
        (tmp / "a.txt").write_text("first")
        (tmp / "old-only.txt").write_text("gone after the second write")
    assert (target / "a.txt").read_text() == "first"
    with model_dir.atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("second")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("nested")
        assert (target / "a.txt").read_text() == "first"  # untouched until the block ends
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "sub"]
    assert (target / "a.txt").read_text() == "second" and (target / "sub" / "b.txt").read_text() == "nested"
    assert target.stat().st_mode & 0o777 == 0o755  # not mkdtemp's private 0o700
    assert _siblings(target) == ["model"]  # no .model.tmp-* or .model.old-* left


def test_an_error_in_the_block_leaves_the_previous_directory(tmp_path):
    target = tmp_path / "model"
    with model_dir.atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("good")
    with pytest.raises(RuntimeError, match="disk full"):
        with model_dir.atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("disk full")
    assert (target / "a.txt").read_text() == "good" and _siblings(target) == ["model"]
    with pytest.raises(KeyboardInterrupt):
        with model_dir.atomic_directory(tmp_path / "fresh"):
            raise KeyboardInterrupt
    assert _siblings(target) == ["model"]  # nothing created for a target that did not exist


def test_files_the_directory_and_its_parent_are_fsynced(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the synced descriptors")
    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "model"
    with model_dir.atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("x")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("y")
    parent, work = tmp_path.resolve(), tmp.resolve()
    names = ["<parent>" if Path(p) == parent else Path(p).relative_to(work).as_posix() for p in synced]
    # Everything inside before the directory itself, and the parent last, after the rename.
    assert sorted(names[:-2]) == ["a.txt", "sub", "sub/b.txt"] and names[-2:] == [".", "<parent>"]
    assert names.index("sub/b.txt") < names.index("sub")


def test_write_replaces_a_model_directory_atomically(tmp_path, tiny_model_dir):
    config, tensors, tokenizer, _ = model_dir.read(tiny_model_dir)
    target = tmp_path / "model"
    model_dir.write(target, config, tensors, tokenizer, {"eval": {"accuracy": 0.5}})
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    class FailingTokenizer:  # the disk fills up half way through the tokenizer file
        def save(self, path: str) -> None:
            Path(path).write_text("{half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        model_dir.write(target, config, tensors, FailingTokenizer(), {"eval": {"accuracy": 0.9}})
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before and _siblings(target) == ["model"]
