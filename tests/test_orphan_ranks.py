"""Ranks spawned by `--procs N` end when their launcher is killed with SIGKILL (they trained on as orphans)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from /proc)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(d.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _train_forever() -> None:
    time.sleep(120)


@pytest.mark.slow
def test_ranks_die_with_a_sigkilled_launcher(tmp_path: Path) -> None:
    script = tmp_path / "launcher.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from ecgfm_cli.train.distributed import launch\n"
        "from test_orphan_ranks import _train_forever\n"
        "if __name__ == '__main__':\n"
        "    launch(_train_forever, (), nprocs=2)\n")
    launcher = subprocess.Popen([sys.executable, str(script)])
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the two ranks (multiprocessing may add a resource tracker)
            ranks = [c for c in children(launcher.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
            if len(ranks) == 2:
                break
            time.sleep(0.2)
        assert len(ranks) == 2, "the ranks did not start"
        time.sleep(1.0)  # past die_with in each rank
        assert all(alive(r) for r in ranks), "the ranks ended by themselves"
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 15
        while any(alive(r) for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [r for r in ranks if alive(r)], "ranks outlived their SIGKILLed launcher"
    finally:
        for pid in [launcher.pid, *children(launcher.pid), *ranks]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
