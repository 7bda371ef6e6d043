"""Shared fixtures: the committed sample data and, when present, ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample_data"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """Small real records committed in the repo (see sample_data/ATTRIBUTION.md)."""
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The full read-only corpus beside the clone; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and a shared CI machine can make OpenMP threads spin-wait."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def invoke(*args) -> str:
    """Run ``ecgfm ARGS`` in-process through typer's test runner; assert it succeeded; its output."""
    from typer.testing import CliRunner

    from ecgfm_cli.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="session")
def sample_segments(sample_data: Path, tmp_path_factory) -> Path:
    """Every sample record (``--fs 500``) ingested and segmented once for the session: a segments directory
    that tests read and never write."""
    root = tmp_path_factory.mktemp("sample-segments")
    invoke("ingest", sample_data, "--fs", "500", "-o", root / "records")
    invoke("segment", root / "records", "-o", root / "segments")
    return root / "segments"


def run_main(capsys, *args) -> tuple[int, str]:
    """Run the real ``ecgfm`` entry point in-process: (exit status, stderr)."""
    import sys

    from ecgfm_cli.cli import main

    old = sys.argv
    sys.argv = ["ecgfm", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    return code, capsys.readouterr().err
