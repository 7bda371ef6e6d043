"""Beyond one machine: ``embed --shard I/N`` jobs form the artifact one job writes, and pretraining ranks read only
their part of a sharded segments directory.

Data: the committed Challenge 2021 sample, segmented in 3 shards (several input files); models: the tiny preset.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import make_segments, segment_sample
from conftest import run_main as ecgfm

from ecgfm_cli.io.artifacts import open_artifact

EMBED = ("--random-init", "--preset", "tiny", "--seed", "2")


@pytest.fixture(scope="module")
def segs(sample_data: Path, tmp_path_factory) -> Path:
    """A segments directory written by 3 ``ingest --shard`` + ``segment --shard`` jobs (3 files)."""
    seg = segment_sample(sample_data / "challenge2021", tmp_path_factory.mktemp("scale"), shards=3)
    assert len(list(seg.glob("segments-*.parquet"))) == 3
    return seg


def _table(path: Path) -> pa.Table:
    return open_artifact(path, "embeddings").read_all()


@pytest.mark.slow
def test_embed_shards_in_any_order_equal_one_job(segs: Path, tmp_path: Path, capsys) -> None:
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    assert ecgfm(capsys, "embed", segs, *EMBED, "-o", one, "--batch-size", "4")[0] == 0
    for i in (2, 0, 3, 1):  # any order, as the tasks of a SLURM array finish
        code, err = ecgfm(capsys, "embed", segs, *EMBED, "-o", sharded, "--batch-size", "4", "--shard", f"{i}/4")
        assert code == 0 and f"(shard {i}/4)" in err, err
    names = sorted(p.name for p in sharded.glob("embeddings-*.parquet"))
    assert names == [f"embeddings-s{i:05d}of00004-p00000.parquet" for i in range(4)]
    a, b = _table(one), _table(sharded)
    # the same rows in the same order, and the same values to the bit: every forward pass holds the same segments
    assert b.num_rows == a.num_rows > 0 and b.equals(a)
    done = json.loads((sharded / "_done-s00001of00004.json").read_text())
    assert done["input_rows"] == a.num_rows and done["parts"] == ["embeddings-s00001of00004-p00000.parquet"]

    # a rerun skips a finished shard without touching it
    before = (sharded / names[1]).stat().st_mtime_ns
    code, err = ecgfm(capsys, "embed", segs, *EMBED, "-o", sharded, "--batch-size", "4", "--shard", "1/4")
    assert code == 0 and "already complete" in err and (sharded / names[1]).stat().st_mtime_ns == before


@pytest.mark.slow
def test_embed_shard_with_processes_and_record_pooling(segs: Path, tmp_path: Path, capsys) -> None:
    """Two processes inside one shard write parts of that shard; --pool record cuts shards at record starts."""
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    assert ecgfm(capsys, "embed", segs, *EMBED, "-o", one, "--pool", "record")[0] == 0
    assert ecgfm(capsys, "embed", segs, *EMBED, "-o", sharded, "--pool", "record", "--shard", "1/2",
                 "--procs", "2")[0] == 0
    assert ecgfm(capsys, "embed", segs, *EMBED, "-o", sharded, "--pool", "record", "--shard", "0/2")[0] == 0
    assert sorted(p.name for p in sharded.glob("embeddings-s00001of00002-*")) == [
        "embeddings-s00001of00002-p00000.parquet", "embeddings-s00001of00002-p01000.parquet"]
    a, b = _table(one), _table(sharded)
    assert b.drop(["embedding"]).equals(a.drop(["embedding"]))  # one row per record: no record split
    x = a.column("embedding").combine_chunks().values.to_numpy().reshape(a.num_rows, -1)
    y = b.column("embedding").combine_chunks().values.to_numpy().reshape(b.num_rows, -1)
    np.testing.assert_allclose(y, x, atol=1e-5)  # another thread count per process: float rounding only


def test_embed_shards_refuse_what_would_not_form_one_artifact(segs: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "e"
    assert ecgfm(capsys, "embed", segs, *EMBED, "-o", out, "--shard", "0/3", "--batch-size", "4")[0] == 0
    for extra, message in [(("--shard", "1/2"), "split into 3 shard(s)"),
                           (("--shard", "1/3", "--batch-size", "8"), "pass --batch-size 4"),
                           (("--shard", "1/3", "--batch-size", "4", "--pool", "record"), "another pool"),
                           (("--shard", "1/3", "--batch-size", "4", "--seed", "5"), "another model")]:
        code, err = ecgfm(capsys, "embed", segs, *EMBED, "-o", out, *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, err = ecgfm(capsys, "embed", segs, *EMBED, "-o", tmp_path / "e.parquet", "--shard", "0/2")
    assert code == 2 and "-o DIR" in err
    # a failed shard leaves no part behind, and the directory reads as incomplete, naming what to rerun
    assert not list(out.glob("embeddings-s00001of00003*"))
    from ecgfm_cli.io.artifacts import incomplete_shards

    problems, rerun = incomplete_shards(out)
    assert any("1/3" in p for p in problems) and "--shard 1/3" in (rerun or "")


# ------------------------------------------------------------------------ pretraining data over many files


def test_each_rank_reads_only_its_files(tmp_path: Path, monkeypatch) -> None:
    """16 files, 2 ranks x 2 loader workers: every rank opens only its own files (none opens every file), the
    ranks' files are disjoint and together every file, each pair comes out once and intact, and a file keeps its
    rank from one epoch to the next (so a node can stage its files on a local disk)."""
    import pyarrow.parquet as pq

    from ecgfm_cli.train import data

    index = data.open_segments(make_segments(tmp_path / "seg", [2 + r % 3 for r in range(96)], window=16,
                                             rows_per_group=4, files=16))
    cfg = data.LoaderConfig(batch_size=4, world_size=2, workers=2, rlm=False, shuffle_buffer=8)
    opened: list[str] = []

    class Spy(pq.ParquetFile):
        def __init__(self, source, *args, **kwargs):
            opened.append(Path(source).name)
            super().__init__(source, *args, **kwargs)

    monkeypatch.setattr(pq, "ParquetFile", Spy)
    per_rank: list[set[str]] = []
    pairs, rank1_epoch0 = [], []
    for rank in range(2):
        opened.clear()
        for b in data.iter_rank(index, cfg, rank, max_epochs=2):
            if rank == 1 and b["epoch"] == 0:
                rank1_epoch0.append(b["rows"].tolist())
            v = np.rint(b["x"][:, 0, 0]).astype(int) - 1
            got = [(int(a) // 1000, int(a) % 1000 // 10) for a in v]
            for k in range(0, len(got), 2):
                assert got[k][0] == got[k + 1][0] and got[k + 1][1] == got[k][1] + 1 and got[k][1] % 2 == 0
                pairs.append((b["epoch"], *got[k]))
        per_rank.append(set(opened))
    every = {f.name for f in index.files}
    assert all(len(files) <= len(every) // 2 + 1 for files in per_rank), per_rank
    assert not per_rank[0] & per_rank[1] and per_rank[0] | per_rank[1] == every
    for epoch in (0, 1):
        seen = [p[1:] for p in pairs if p[0] == epoch]
        assert len(seen) == len(set(seen)) and len(seen) >= index.stats.pairs - cfg.consumers * (cfg.batch_items + 4)
    # the order of batches is a function of the seed and the consumers: rank 1 iterated alone, without rank 0
    # before it, gets the batches it got in the loop above
    alone = [b["rows"].tolist() for b in data.iter_rank(index, cfg, 1, max_epochs=1)]
    assert alone == rank1_epoch0
