"""A pretraining run removes the half-written checkpoints that killed runs of it left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import invoke

TINY = ("--preset", "tiny", "--batch-size", "8", "--num-negatives", "10", "--workers", "1")
pytestmark = pytest.mark.usefixtures("one_thread")


def dead_pid() -> int:
    """The pid of a process that has exited."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_killed_runs_partial_checkpoint_is_removed_on_resume(challenge_segments: Path, tmp_path: Path) -> None:
    """`kill -9` while a checkpoint is written leaves `.checkpoint-N.partial-PID` (a full model copy, tens of MB
    for base); the resumed run deletes it. A live process's partial directory is left alone."""
    run = tmp_path / "run"
    invoke("pretrain", challenge_segments, "-o", run, *TINY, "--max-updates", "2", "--save-every", "2")
    dead = run / f".checkpoint-4.partial-{dead_pid()}"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "model.safetensors").write_bytes(b"\0" * 1024)
    beyond = run / f".checkpoint-5.partial-{2**22 + 1}"  # beyond Linux's largest pid_max: no such process
    beyond.mkdir()
    live = run / f".checkpoint-6.partial-{1}"  # pid 1 is always alive
    live.mkdir()
    out = invoke("pretrain", challenge_segments, "-o", run, *TINY, "--max-updates", "3", "--save-every", "3",
                 "--resume")
    assert not dead.exists() and not beyond.exists()
    assert live.exists()
    assert "removed 2 half-written checkpoints of killed runs" in out, out
    assert (run / "checkpoint-3").is_dir()
