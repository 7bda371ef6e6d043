"""The pretraining data pipeline (ecgfm_cli/train/data.py): CMSC pairs, partitioning, RLM, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import make_segments

from ecgfm_cli.contract import Contract
from ecgfm_cli.errors import EcgfmError
from ecgfm_cli.train.data import (
    LoaderConfig,
    assign_units,
    epoch_plan,
    iter_rank,
    lead_keep,
    make_loader,
    open_segments,
)


def decode(x: np.ndarray) -> list[tuple[int, int]]:
    """(record, segment) of every row of a batch, from the marker at sample 0 of lead 0 (RLM off)."""
    v = np.rint(x[:, 0, 0]).astype(int) - 1
    return [(int(a) // 1000, int(a) % 1000 // 10) for a in v]


COUNTS = [3, 1, 2, 5, 2, 4, 1, 2, 7, 2, 2, 1, 6, 2, 3, 2, 2, 4]


@pytest.fixture
def segs(tmp_path: Path) -> Path:
    # 3 rows per row group: many records and pairs straddle row-group boundaries.
    return make_segments(tmp_path / "seg", COUNTS, window=32, rows_per_group=3)


def expected_pairs(counts: list[int]) -> set[tuple[int, int]]:
    return {(r, s) for r, n in enumerate(counts) for s in range(0, n - 1, 2)}


def test_index_counts_pairs_and_left_out(segs: Path) -> None:
    index = open_segments(segs)
    st = index.stats
    assert st.segments == sum(COUNTS) and st.records == len(COUNTS)
    assert st.pairs == len(expected_pairs(COUNTS))
    assert st.single_records == COUNTS.count(1)
    assert st.odd_leftovers == sum(n % 2 for n in COUNTS if n > 1)
    assert "single-segment records" in st.describe()
    # some pairs do straddle a row-group boundary
    ends = set((index.rg_start + index.rg_rows - 1).tolist())
    assert any(int(r) in ends for r in index.pair_first)


def test_pairs_correct_across_row_groups_and_batches(segs: Path) -> None:
    index = open_segments(segs)
    n_pairs = index.stats.pairs  # 22: 11 batches of 2 pairs
    cfg = LoaderConfig(batch_size=4, rlm=False, shuffle_buffer=5)
    seen = []
    for b in iter_rank(index, cfg, 0, max_epochs=1):
        got = decode(b["x"])
        for i in range(0, len(got), 2):
            (r0, s0), (r1, s1) = got[i], got[i + 1]
            assert r0 == r1 and s0 % 2 == 0 and s1 == s0 + 1
            assert b["record"][i] == b["record"][i + 1]
            seen.append((r0, s0))
        # the record ids match the decoded records: equal ids <=> same record
        ids, recs = b["record"], [r for r, _ in got]
        assert all((ids[i] == ids[j]) == (recs[i] == recs[j]) for i in range(len(ids)) for j in range(len(ids)))
    assert len(seen) == len(set(seen)) == n_pairs - n_pairs % 2
    assert set(seen) <= expected_pairs(COUNTS)


def test_no_cmsc_yields_every_segment(segs: Path) -> None:
    index = open_segments(segs)
    cfg = LoaderConfig(batch_size=5, cmsc=False, rlm=False)
    got = [rs for b in iter_rank(index, cfg, 0, max_epochs=1) for rs in decode(b["x"])]
    allrows = {(r, s) for r, n in enumerate(COUNTS) for s in range(n)}
    assert len(got) == len(set(got)) == sum(COUNTS) - sum(COUNTS) % 5
    assert set(got) <= allrows and any(COUNTS[r] == 1 for r, _ in got)


def test_partition_disjoint_and_covering(segs: Path) -> None:
    index = open_segments(segs)
    cfg = LoaderConfig(batch_size=2, world_size=2, workers=2, rlm=False)
    for epoch in (0, 1):
        owned, starts, stops = assign_units(index, cfg, epoch)
        units = np.concatenate(owned)
        assert sorted(units.tolist()) == list(range(len(starts)))  # disjoint and covering
        plans = [epoch_plan(index, cfg, epoch, c) for c in range(cfg.consumers)]
        assert len({p.shape for p in plans}) == 1  # every consumer gets the same number of batches
        rows = np.concatenate([p.reshape(-1) for p in plans])
        assert len(rows) == len(set(rows.tolist()))
        # each consumer's rows come from its own units only
        for c, p in enumerate(plans):
            u = np.searchsorted(starts, p.reshape(-1), side="right") - 1
            assert set(u.tolist()) <= set(owned[c].tolist())
        # balance: at most one batch's worth of items per consumer is dropped
        assert index.stats.pairs - len(rows) < cfg.consumers * (cfg.batch_items + max(np.diff(
            np.searchsorted(index.pair_first, np.append(starts, stops[-1])))))


def test_rlm_statistics_and_application(tmp_path: Path) -> None:
    path = make_segments(tmp_path / "seg", [2] * 400, window=16, rows_per_group=64)
    index = open_segments(path)
    cfg = LoaderConfig(batch_size=64, seed=3)
    plain = {b["batch"]: b["x"] for b in iter_rank(index, LoaderConfig(batch_size=64, seed=3, rlm=False), 0,
                                                     max_epochs=1)}
    keeps = []
    for b in iter_rank(index, cfg, 0, max_epochs=1):
        keep = b["keep"]
        keeps.append(keep)
        x = b["x"]
        np.testing.assert_array_equal(x[~keep], 0.0)
        np.testing.assert_array_equal(x[keep], plain[b["batch"]][keep])
    k = np.concatenate(keeps).astype(float)
    assert abs(k.mean() - 0.5) < 0.02
    first, second = k[0::2], k[1::2]  # the two segments of each pair
    assert abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]) < 0.05
    assert abs((first == second).mean() - 0.5) < 0.03
    # rlm_apply_prob: the share of segments perturbed at all; seeded by position, so reproducible
    never = LoaderConfig(batch_size=64, seed=3, rlm_apply_prob=0.0)
    assert lead_keep(never, 0, 0, 0, 200, 12).all()
    half = lead_keep(LoaderConfig(batch_size=64, seed=3, rlm_apply_prob=0.5), 0, 0, 0, 4000, 12)
    assert abs(half.all(axis=1).mean() - 0.5) < 0.05
    np.testing.assert_array_equal(lead_keep(cfg, 2, 1, 7, 8, 12), lead_keep(cfg, 2, 1, 7, 8, 12))


def test_deterministic_for_a_seed(segs: Path) -> None:
    index = open_segments(segs)

    def run(seed: int, epoch: int = 0) -> list:
        cfg = LoaderConfig(batch_size=4, seed=seed)
        return [(b["x"].copy(), b["keep"].copy()) for b in iter_rank(index, cfg, 0, start_epoch=epoch,
                                                                     max_epochs=epoch + 1)]

    a, b, c, d = run(5), run(5), run(6), run(5, epoch=1)
    assert all(np.array_equal(x, y) and np.array_equal(k, m) for (x, k), (y, m) in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for (x, _), (y, _) in zip(a, c, strict=True))
    assert not all(np.array_equal(x, y) for (x, _), (y, _) in zip(a, d, strict=True))


@pytest.mark.parametrize("processes", [False, True])
def test_skip_to_position_matches_the_full_stream(segs: Path, processes: bool) -> None:
    """Resuming the loader at (epoch, batch) gives exactly the rest of the uninterrupted stream, with the
    background thread or with DataLoader worker processes (round-robin order)."""
    index = open_segments(segs)
    cfg = LoaderConfig(batch_size=2, seed=2, workers=2, shuffle_buffer=4)
    full = [(b["epoch"], b["x"].copy()) for b in iter_rank(index, cfg, 0, max_epochs=2)]
    per_epoch = len(full) // 2
    for k in (3, per_epoch + 1):
        epoch, batch = divmod(k, per_epoch)
        rest = [(int(b["epoch"]), np.asarray(b["x"])) for b in make_loader(
            index, cfg, 0, epoch, batch, max_epochs=2, processes=processes)]
        assert len(rest) == len(full) - k
        assert all(e == f and np.array_equal(x, y) for (e, x), (f, y) in zip(rest, full[k:], strict=True))


def test_float16_segments_become_float32(tmp_path: Path) -> None:
    path = make_segments(tmp_path / "seg", [2, 2, 2, 2], window=8, dtype="float16")
    b = next(iter_rank(open_segments(path), LoaderConfig(batch_size=4, rlm=False), 0))
    assert b["x"].dtype == np.float32 and decode(b["x"])[0][1] in (0, 1)


def test_refuses_contract_mismatch_and_non_segments(tmp_path: Path, sample_data: Path) -> None:
    path = make_segments(tmp_path / "seg", [2, 2], contract=Contract(sample_rate=250, window=1250, stride=1250),
                         window=1250)
    with pytest.raises(EcgfmError, match="sample_rate.*250.*500") as e:
        open_segments(path, Contract())
    assert "window" in str(e.value)
    rec = tmp_path / "records.parquet"
    from ecgfm_cli.io.artifacts import write_table

    write_table(pa.table({"record_id": ["a"]}), rec, "records")
    with pytest.raises(EcgfmError, match="holds records, not segments"):
        open_segments(rec)
    empty = make_segments(tmp_path / "empty", [])
    with pytest.raises(EcgfmError, match="no segments"):
        open_segments(empty)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(EcgfmError, match="no segments files"):
        open_segments(tmp_path / "nothing")
    with pytest.raises(EcgfmError, match="stdin"):
        open_segments("-")


def test_every_rank_and_worker_reads_correct_pairs(tmp_path: Path) -> None:
    """2 ranks x 2 workers over 16-row groups: pairs that straddle a row group whose other rows belong to
    another partition are read from just the needed rows; together the partitions yield each pair once."""
    counts = COUNTS * 4
    path = make_segments(tmp_path / "seg", counts, window=16, rows_per_group=16)
    index = open_segments(path)
    cfg = LoaderConfig(batch_size=4, world_size=2, workers=2, rlm=False, shuffle_buffer=8)
    seen = []
    for rank in range(2):
        for b in iter_rank(index, cfg, rank, max_epochs=1):
            got = decode(b["x"])
            for i in range(0, len(got), 2):
                assert got[i][0] == got[i + 1][0] and got[i + 1][1] == got[i][1] + 1 and got[i][1] % 2 == 0
                seen.append(got[i])
    assert len(seen) == len(set(seen)) and set(seen) <= expected_pairs(counts)
    assert len(seen) >= index.stats.pairs - cfg.consumers * 20


def test_unreadable_shard_and_null_signals_are_refused(tmp_path: Path) -> None:
    """A corrupt second shard is one clear error at open; a null signal row (which ``ecgfm segment`` never writes)
    is refused when read instead of shifting every later row by one."""
    import pyarrow.parquet as pq

    path = make_segments(tmp_path / "seg", [2, 2, 2, 2], window=8, rows_per_group=4)
    (shard,) = path.glob("*.parquet")
    table = pq.read_table(shard)
    signal = table.column("signal").combine_chunks()
    holes = pa.FixedSizeListArray.from_arrays(signal.values, type=signal.type,
                                              mask=pa.array([False, True] + [False] * (len(signal) - 2)))
    field = table.schema.field("signal").with_nullable(True)
    pq.write_table(table.set_column(table.schema.get_field_index("signal"), field, holes), shard, row_group_size=4)
    with pytest.raises(ValueError, match="row group 0 holds 1 null signals"):
        list(iter_rank(open_segments(path), LoaderConfig(batch_size=2, rlm=False, cmsc=False), 0))

    bad = shard.with_name(shard.name.replace("p00000", "p00001"))
    bad.write_bytes(b"PAR1 not a parquet file")
    with pytest.raises(EcgfmError, match=f"{bad}: cannot read as Parquet: the file is cut short"):
        open_segments(path)


def test_an_empty_epoch_is_skipped_not_the_end(segs: Path, monkeypatch) -> None:
    """The batch count of an epoch varies with the unit shuffle: an epoch that comes out empty on barely enough
    data must not end the stream (it would end a run early, reported as max-epochs)."""
    from ecgfm_cli.train import data

    real = data.epoch_plan

    def plan(index, cfg, epoch, consumer):
        out = real(index, cfg, epoch, consumer)
        return out[:0] if epoch == 1 else out

    monkeypatch.setattr(data, "epoch_plan", plan)
    cfg = LoaderConfig(batch_size=4, rlm=False)
    epochs = {b["epoch"] for b in iter_rank(open_segments(segs), cfg, 0, max_epochs=3)}
    assert epochs == {0, 2}
