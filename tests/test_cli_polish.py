"""The CLI's surface: --version, Ctrl-C, help that fits a terminal, progress in the user's units."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ecgfm_cli import __version__
from ecgfm_cli.cli import first_sentence, interrupted_message

ECGFM = [sys.executable, "-m", "ecgfm_cli"]


def _run(*args: str, columns: int = 80) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "dumb"}
    return subprocess.run([*ECGFM, *args], capture_output=True, text=True, env=env, timeout=120)


def test_version():
    r = _run("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"ecgfm {__version__}"


def test_pretrain_help_fits_and_has_no_duplicate_panel():
    r = _run("pretrain", "--help")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert len(lines) < 146, len(lines)  # 212, then 159 before: a help page, not a manual
    titles = [ln.split("─")[1].strip() for ln in lines if ln.startswith("╭─")]
    assert len(titles) == len(set(titles)), titles
    assert "Objective (defaults: ECG-FM)" in titles
    assert "<float range>" not in r.stdout  # short metavars keep the help column wide


def test_top_level_help_summaries_are_whole_sentences():
    r = _run("--help", columns=400)
    rows = [ln.strip("│ ").strip() for ln in r.stdout.splitlines() if ln.startswith("│ ")]
    commands = {"ingest", "segment", "convert", "embed", "pretrain", "finetune", "probe", "evaluate"}
    summaries = {row.split()[0]: row for row in rows if row.split() and row.split()[0] in commands}
    assert set(summaries) == commands
    for name, row in summaries.items():
        assert row.endswith("."), (name, row)  # one sentence per command, never cut mid-way


def test_first_sentence():
    assert first_sentence("Do a thing\n    over two lines. More detail.\n\nArgs") == "Do a thing over two lines."
    assert first_sentence("No full stop") == "No full stop"
    assert first_sentence(None) == ""


def test_interrupted_message_says_how_to_continue():
    assert "--resume" in interrupted_message("ecgfm pretrain")
    assert "rerun" in interrupted_message("ecgfm ingest")
    assert interrupted_message("ecgfm") == "ecgfm: interrupted"


def _wait_blocked_on_stdin(pid: int, timeout: float = 180.0) -> None:
    """Wait until the process sleeps reading its (empty) stdin pipe, i.e. it is past its imports."""
    wchan = Path(f"/proc/{pid}/wchan")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if "pipe" in wchan.read_text():
                return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.skip("could not see the process block on its stdin (no /proc wchan)")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    proc = subprocess.Popen([*ECGFM, "segment", "-", "-o", str(tmp_path / "seg")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_blocked_on_stdin(proc.pid)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.strip() == interrupted_message("ecgfm segment"), err
    assert "Traceback" not in err


def test_progress_counts_items_by_size(monkeypatch):
    import tqdm

    from ecgfm_cli import console

    counted: list[float] = []

    class Bar(tqdm.tqdm):
        def update(self, n: float = 1) -> bool | None:
            counted.append(n)
            return super().update(n)

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    batches = [list(range(5)), list(range(3))]
    assert list(console.progress(iter(batches), "embed", total=8, unit="segment", size=len)) == batches
    assert counted == [5, 3]
