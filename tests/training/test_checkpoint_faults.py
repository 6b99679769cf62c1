"""Checkpoints under faults: flushed to disk before they are committed, a re-saved step never missing, what a killed
save left behind cleaned on the next run, and a resumed run's log without a step twice."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from magdiff.training import checkpoint
from magdiff.training.checkpoint import clean_checkpoint_folder, list_checkpoints, staged_checkpoint
from magdiff.training.trainer import drop_records_after


def _save(root: Path, step: int, content: str) -> Path:
    with staged_checkpoint(root, step, keep=5) as staging:
        (staging / "unet.safetensors").write_text(content)
        (staging / "nested").mkdir()
        (staging / "nested" / "state.json").write_text(content)
    return root / f"step_{step:06d}"


def test_every_file_and_folder_is_flushed_before_the_checkpoint_is_committed(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_commit = os.fsync, checkpoint._commit

    def fsync(descriptor: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def commit(staging: Path, final: Path) -> None:
        events.append(("commit", str(staging)))
        real_commit(staging, final)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(checkpoint, "_commit", commit)
    final = _save(tmp_path, 3, "weights")
    (commit_index,) = [index for index, (kind, _) in enumerate(events) if kind == "commit"]
    staging = events[commit_index][1]
    flushed_before = {path for kind, path in events[:commit_index] if kind == "fsync"}
    expected = {staging, f"{staging}/nested", f"{staging}/unet.safetensors", f"{staging}/nested/state.json"}
    assert expected <= flushed_before, sorted(expected - flushed_before)
    assert ("fsync", str(tmp_path)) in events[commit_index + 1 :]  # the rename itself is flushed too
    assert (final / "nested" / "state.json").read_text() == "weights"


def test_re_saving_a_step_never_leaves_it_missing(tmp_path, monkeypatch):
    final = _save(tmp_path, 2, "old")
    real_rmtree = shutil.rmtree
    seen: list[str] = []

    def rmtree(path, *args, **kwargs):
        real_rmtree(path, *args, **kwargs)
        seen.append((final / "unet.safetensors").read_text())  # a complete step 2 after every removal

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    _save(tmp_path, 2, "new")
    assert seen and seen[-1] == "new"
    assert (final / "nested" / "state.json").read_text() == "new"
    assert [path.name for path in tmp_path.iterdir()] == ["step_000002"]


def test_without_an_atomic_exchange_a_failed_re_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    final = _save(tmp_path, 2, "old")
    monkeypatch.setattr(checkpoint, "_exchange", lambda first, second: False)
    real_rename = Path.rename

    def rename(self, target):
        if Path(target) == final and self.name.startswith(".step_000002.") and "replaced" not in self.name:
            raise OSError("disk full")  # the new folder cannot be moved in
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2, "new")
    assert (final / "unet.safetensors").read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["step_000002"]
    monkeypatch.setattr(Path, "rename", real_rename)
    _save(tmp_path, 2, "new")  # the fallback path itself
    assert (final / "unet.safetensors").read_text() == "new"
    assert [path.name for path in tmp_path.iterdir()] == ["step_000002"]


def test_the_next_run_cleans_what_a_killed_save_left(tmp_path):
    # A power loss between the fallback's two renames: the old step 4 aside, its new folder half written; and an
    # orphaned staging folder of step 6.
    (tmp_path / ".step_000004.replaced").mkdir()
    (tmp_path / ".step_000004.replaced" / "unet.safetensors").write_text("old 4")
    (tmp_path / ".step_000004.k2j1x0").mkdir()
    (tmp_path / ".step_000006.a8d0qq").mkdir()
    (tmp_path / ".step_000006.a8d0qq" / "unet.safetensors").write_bytes(b"\0" * 4096)
    removed = clean_checkpoint_folder(tmp_path)
    assert sorted(path.name for path in removed) == [".step_000004.k2j1x0", ".step_000006.a8d0qq"]
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step_000004"]
    assert (tmp_path / "step_000004" / "unet.safetensors").read_text() == "old 4"
    (tmp_path / ".step_000001.zzz").mkdir()
    _save(tmp_path, 8, "eight")  # every save cleans first
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step_000004", "step_000008"]


def test_drop_records_after(tmp_path):
    log = tmp_path / "train_log.jsonl"
    records = [
        {"step": 1},
        {"step": 2},
        {"final_weight_checksums": [2.0]},
        {"step": 3},
        {"final_weight_checksums": [3.0]},
    ]
    log.write_text("".join(json.dumps(record) + "\n" for record in records) + '{"step": 4, "lo')  # cut short
    drop_records_after(log, 2)
    assert [json.loads(line) for line in log.read_text().splitlines()] == records[:3]
    drop_records_after(tmp_path / "missing.jsonl", 2)  # no log yet: nothing to do
    assert not (tmp_path / "missing.jsonl").exists()


def test_a_run_resumed_from_an_earlier_checkpoint_logs_every_step_once(tmp_path):
    from magdiff.training.config import config_from_dict, get_preset
    from magdiff.training.trainer import train

    values = {"num_train_samples": 2, "batch_size": 1, "unet_channels": (16, 32), "num_frames": 2}
    values |= {"max_steps": 3, "checkpoint_every": 1, "log_every": 1, "output_dir": str(tmp_path / "run")}
    values |= {"validate_every": 100, "keep_checkpoints": 5}
    config = config_from_dict(values, get_preset("world-tiny"))
    train(config, progress=False)
    # the run stopped after step 3; it is resumed from step 1 (as after a lost step 2 and 3)
    train(config, resume=str(tmp_path / "run" / "checkpoints" / "step_000001"), progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [record.get("step") for record in records] == [1, 2, 3, None]
    assert "final_weight_checksums" in records[-1]  # the resumed run's end, once
