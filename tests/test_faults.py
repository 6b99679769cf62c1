"""Faults while writing: SIGTERM is handled like Ctrl-C (the partial file removed, exit 143), a writer killed outright
leaves a partial file that the next write removes, and an output that is replaced keeps its permissions and says so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from magdiff.cli import main
from magdiff.media import remove_stale_partials, save_video

VIDEO = np.zeros((2, 8, 8, 3), dtype=np.uint8)


def _subject(path: Path) -> Path:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[4:12, 4:12] = 255
    PIL.Image.fromarray(rgba, "RGBA").save(path)
    return path


def _command(model: Path, tmp_path: Path, out: Path) -> list[str]:
    subject = _subject(tmp_path / "subject.png")
    options = ["--prompt", "a cat", "--num-frames", "2", "--steps", "1", "--out", str(out)]
    return ["generate", "--model", str(model), "--subject", str(subject), *options]


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_sigterm_while_writing_removes_the_partial_file(saved_tiny_model, tmp_path):
    out = tmp_path / "out.gif"
    # The command, with a GIF writer that writes part of its file and then waits: SIGTERM arrives mid-write.
    script = textwrap.dedent(
        f"""
        import sys, time
        from magdiff import media
        from magdiff.cli import main

        def slow_writer(arrays, tmp, fps):
            tmp.write_bytes(b"GIF89a partial")
            print("writing", flush=True)
            time.sleep(60)

        media._write_gif = slow_writer
        sys.exit(main({_command(saved_tiny_model, tmp_path, out)!r}))
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "writing"
        partials = [path for path in tmp_path.iterdir() if ".partial" in path.name]
        assert len(partials) == 1  # the write is under way
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "terminated"
    assert not out.exists()
    assert not [path for path in tmp_path.iterdir() if ".partial" in path.name]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_next_write_removes_partials_of_killed_writers_only(tmp_path):
    out = tmp_path / "clip.gif"
    killed = tmp_path / f".clip.0123456789ab.{_dead_pid()}.partial.gif"
    older_format = tmp_path / ".clip.ba9876543210.partial.gif"  # named before the writer's pid was in the name
    running = tmp_path / f".clip.0123456789ab.{os.getpid()}.partial.gif"  # a write under way in a live process
    other_output = tmp_path / f".other.0123456789ab.{_dead_pid()}.partial.gif"
    for path in (killed, older_format, running, other_output):
        path.write_bytes(b"\0" * 1024)
    save_video(VIDEO, out, fps=4)
    assert out.is_file()
    assert not killed.exists() and not older_format.exists()
    assert running.exists() and other_output.exists()
    assert remove_stale_partials(tmp_path / "other.gif") == [other_output]


def test_a_replaced_output_keeps_its_permissions_and_the_command_says_it_replaced_it(
    saved_tiny_model, tmp_path, capsys
):
    out = tmp_path / "out.gif"
    save_video(VIDEO, out, fps=4)
    out.chmod(0o640)
    save_video(VIDEO, out, fps=8)
    assert out.stat().st_mode & 0o777 == 0o640
    command = _command(saved_tiny_model, tmp_path, out)
    assert main(command) == 0
    assert out.stat().st_mode & 0o777 == 0o640
    assert "replaced the existing file" in capsys.readouterr().out
    out.unlink()
    assert main(command) == 0
    assert "replaced the existing file" not in capsys.readouterr().out
