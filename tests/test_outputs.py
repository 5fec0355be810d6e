"""Atomic outputs: nothing half-written under a final name, no leftovers after a crash."""

from __future__ import annotations

import os
import stat

import pytest

from shrinkflow.outputs import atomic_dir, atomic_file, read_json, write_json


def test_atomic_dir_replaces_only_on_success(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(final) as staging:
        (staging / "new.txt").write_text("half")
        raise RuntimeError("killed")
    assert (final / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(final) as staging:
        (staging / "new.txt").write_text("whole")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]


def test_atomic_file_and_json(tmp_path):
    target = tmp_path / "sub" / "m.json"
    write_json(target, {"b": 1, "a": [1, 2]})
    assert read_json(target) == {"a": [1, 2], "b": 1}
    with pytest.raises(ValueError), atomic_file(target) as tmp:
        tmp.write_text("garbage")
        raise ValueError
    assert read_json(target) == {"a": [1, 2], "b": 1}
    assert [p.name for p in target.parent.iterdir()] == ["m.json"]


def test_leftovers_of_a_killed_attempt_are_removed(tmp_path):
    final = tmp_path / "model"
    (tmp_path / ".tmp-model-abc123").mkdir()
    (tmp_path / ".tmp-model-abc123" / "model.pt").write_text("partial")
    (tmp_path / ".tmp-other-1").mkdir()  # belongs to another output: left alone
    with atomic_dir(final) as staging:
        (staging / "model.pt").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-other-1", "model"]


def test_outputs_get_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d") as staging:
            (staging / "f").write_text("x")
        write_json(tmp_path / "m.json", {})
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644
