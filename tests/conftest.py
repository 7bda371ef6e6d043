"""Shared fixtures and helpers: the committed sample data (and segments of it), ../shared/data when present,
synthetic segments, and in-process runs of ``ecgfm``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from ecgfm_cli.contract import Contract

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


def segment_sample(src: Path, root: Path, *ingest_args, segments: str = "segments", shards: int = 1) -> Path:
    """``ecgfm ingest SRC INGEST_ARGS -o ROOT/records``, then ``ecgfm segment ROOT/records -o ROOT/SEGMENTS`` (the
    default contract), each as ``shards`` jobs ``--shard I/SHARDS`` when ``shards`` > 1. Returns ROOT/SEGMENTS: one
    Parquet file when SEGMENTS ends in .parquet, else a directory (labels-*.parquet beside the segments)."""
    jobs = [("--shard", f"{i}/{shards}") for i in range(shards)] if shards > 1 else [()]
    for shard in jobs:
        invoke("ingest", src, *ingest_args, "-o", root / "records", *shard)
    for shard in jobs:
        invoke("segment", root / "records", "-o", root / segments, *shard)
    return root / segments


@pytest.fixture(scope="session")
def sample_segments(sample_data: Path, tmp_path_factory) -> Path:
    """Every sample record (``--fs 500``) ingested and segmented once for the session: a segments directory
    that tests read and never write."""
    return segment_sample(sample_data, tmp_path_factory.mktemp("sample-segments"), "--fs", "500")


@pytest.fixture(scope="session")
def challenge_segments(sample_data: Path, tmp_path_factory) -> Path:
    """The committed Challenge 2021 sample (22 records, 46 segments) ingested and segmented once for the session:
    a segments directory with its labels-*.parquet, its records in ``../records``; tests read them, never write."""
    return segment_sample(sample_data / "challenge2021", tmp_path_factory.mktemp("challenge-segments"))


def make_segments(path: Path, counts: list[int], window: int = 2500, n_leads: int = 12, rows_per_group: int = 128,
                  contract: Contract | None = None, seed: int = 0, dtype: str = "float32", files: int = 1) -> Path:
    """Write a synthetic segments artifact without ``ecgfm segment``: record r has ``counts[r]`` segments, and lead l
    of its segment s holds ``1000 * r + 10 * s + l + 1`` at sample 0 (the rest is noise), so tests can see which
    rows they got. ``files`` > 1: the ``files`` shards that ``segment --shard I/FILES`` jobs write, record r in
    shard r % files. ``contract`` defaults to ``window`` samples at 500 Hz."""
    import numpy as np
    import pyarrow as pa

    from ecgfm_cli.contract import Contract
    from ecgfm_cli.io.artifacts import ArtifactWriter, Output, write_done_marker
    from ecgfm_cli.io.schema import segments_schema

    contract = contract or Contract(window=window, stride=window)
    schema = segments_schema(n_leads, window, dtype).with_metadata({b"ecgfm.contract": contract.to_json().encode()})
    rng = np.random.default_rng(seed)
    for i in range(files):
        rows = [(r, s) for r in range(i, len(counts), files) for s in range(counts[r])]
        n = len(rows)
        w = ArtifactWriter(Output("dir", path), "segments", schema, shard=(i, files), row_group_rows=rows_per_group)
        if rows:
            sig = rng.standard_normal((n, n_leads, window), dtype=np.float32)
            for k, (r, s) in enumerate(rows):
                sig[k, :, 0] = 1000 * r + 10 * s + np.arange(n_leads) + 1
            cols = {
                "record_id": pa.array([f"rec{r:05d}" for r, _ in rows]),
                "segment_index": pa.array([s for _, s in rows], pa.int32()),
                "start_sample": pa.array([s * window for _, s in rows], pa.int64()),
                "signal": pa.FixedSizeListArray.from_arrays(pa.array(sig.reshape(-1).astype(dtype)), n_leads * window),
                "lead_present": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n * n_leads, bool)), n_leads),
                "sample_rate_orig": pa.array([500.0] * n),
                "padded": pa.array([False] * n),
            }
            w.write(pa.table({f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in schema}, schema=schema))
        w.close()
        write_done_marker(path, (i, files), {"kind": "segments", "segments": n, "parts": [f.name for f in w.files]})
    return path


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
