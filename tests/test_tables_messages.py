"""The other Arrow layouts a table file may hold (ecgfm_cli/io/tables.py): an Arrow IPC stream saved to a file and a
Feather v1 file are read like an Arrow IPC file, whichever command reads them; a cut one is named as cut."""

from __future__ import annotations

import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.feather as feather
import pytest
from test_tables import small_table, write_segments

from ecgfm_cli.errors import EcgfmError
from ecgfm_cli.io.tables import TableFileError, open_table


def write_stream(path: Path, table: pa.Table, group_rows: int) -> Path:
    """``table`` as an Arrow IPC stream (what ``ecgfm ... -o - > FILE`` leaves), batches of ``group_rows``."""
    with pa.ipc.new_stream(str(path), table.schema) as w:
        w.write_table(table, max_chunksize=group_rows)
    return path


def write_feather_v1(path: Path, table: pa.Table) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        feather.write_feather(table, str(path), version=1)
    return path


def test_a_stream_file_reads_as_an_arrow_file(tmp_path: Path) -> None:
    t = small_table(10)
    with open_table(write_stream(tmp_path / "t.arrow", t, 4)) as f:
        assert f.format == "stream" and f.metadata == {"ecgfm.kind": "labels"}
        assert f.num_rows == 10 and f.group_rows == [4, 4, 2] and f.num_groups == 3
        assert f.read().equals(t) and f.read(["b"]).column_names == ["b"]
        assert f.read_group(1, ["a"], head=2).column("a").to_pylist() == [4, 5]
        assert [v for b in f.iter_rows(3, 9, ["a"], batch_size=2) for v in b.column("a").to_pylist()] == list(
            range(3, 9))


def test_a_cut_stream_file_is_named_as_cut(tmp_path: Path) -> None:
    """pyarrow takes a stream cut exactly between two batches for a shorter whole one: the end-of-stream marker
    decides."""
    whole = write_stream(tmp_path / "t.arrow", small_table(10), 4).read_bytes()
    boundary = whole[: -8]  # the marker gone: every batch complete, the stream not
    for name, data in {"boundary.arrow": boundary, "mid.arrow": whole[: len(whole) // 2]}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TableFileError) as e:
            open_table(tmp_path / name)
        assert e.value.kind == "truncated" and str(e.value).startswith(f"{tmp_path / name}: cannot read as an "
                                                                       "Arrow IPC stream: ")
        assert "cut short" in str(e.value) and "stdin" not in str(e.value)


def test_pretrain_reads_a_saved_segments_stream(tmp_path: Path) -> None:
    """`ecgfm segment -o - > seg.arrow` then `ecgfm pretrain seg.arrow`: pretrain takes no stdin, and was told to
    feed the file on stdin; the stream is now read as the segments file it is."""
    from ecgfm_cli.train.data import open_segments

    src = write_segments(tmp_path / "seg.arrow", 10)
    with open_table(src) as f:
        stream = write_stream(tmp_path / "seg-stream.arrow", f.read(), 4)
    index, expected = open_segments(stream, None, "pretrain"), open_segments(src, None, "pretrain")
    assert index.stats == expected.stats and list(index.rg_rows) == list(expected.rg_rows) == [4, 4, 2]


def test_a_feather_v1_table_is_read(tmp_path: Path) -> None:
    """Feather v1 (before Arrow IPC files: pandas' and R's old default) was 'neither Parquet nor Arrow IPC';
    pyarrow reads it, so it is read (a labels table given to probe/evaluate/finetune goes through here)."""
    from ecgfm_cli.labels import read_table

    t = pa.table({"record_id": ["a", "b", "c"], "AF": [1, 0, 1]})
    path = write_feather_v1(tmp_path / "labels.feather", t)
    with open_table(path) as f:
        assert f.format == "feather1" and f.num_rows == 3 and f.read(["AF"]).column("AF").to_pylist() == [1, 0, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pyarrow's deprecation warning is not passed on to the user
        assert read_table(path).equals(t)
    (tmp_path / "cut.feather").write_bytes(path.read_bytes()[:40])
    with pytest.raises(TableFileError, match="cannot read as a Feather v1 file: the file is cut short") as e:
        open_table(tmp_path / "cut.feather")
    assert e.value.kind == "truncated"


def test_feather_v1_without_pyarrow_support_says_how_to_convert(tmp_path: Path, monkeypatch) -> None:
    """pyarrow deprecates Feather v1 (25.0): once a pyarrow drops it, the file is named for what it is."""
    path = write_feather_v1(tmp_path / "old.feather", small_table(3))

    def dropped(*args, **kwargs):
        raise pa.ArrowNotImplementedError("Feather V1 is no longer supported")

    monkeypatch.setattr(feather, "read_table", dropped)
    with pytest.raises(EcgfmError) as e:
        open_table(path)
    message = str(e.value)
    assert e.value.kind == "foreign" and message.startswith(f"{path}: cannot read a Feather v1 file with this pyarrow")
    assert "write_feather(f.read_table(" in message and "\n" not in message


def test_a_segments_file_given_as_labels_is_refused_from_its_footer(tmp_path: Path, monkeypatch) -> None:
    """`--labels seg.arrow` (probe/evaluate/finetune): the whole file, signal included, was read (a 224 MB Parquet
    segments file: 6.2 s and 1 GB of memory) to end on 'record_id not unique', or, with one segment per record as
    here, with start_sample, sample_rate_orig, padded and age taken for labels. One line now, from the footer."""
    import ecgfm_cli.io.tables as tables
    from ecgfm_cli.labels import LabelError, load_labels, read_table

    seg = write_segments(tmp_path / "seg.parquet", 10)
    read = []
    monkeypatch.setattr(tables.TableFile, "read", lambda self, columns=None: read.append(self.path))
    with pytest.raises(LabelError) as e:
        load_labels(seg)
    assert str(e.value) == f"{seg}: holds segments (one row per segment, with its signal), not a labels table"
    assert read == []  # nothing but the footer
    monkeypatch.undo()
    labels = pa.table({"record_id": [f"rec{i:03d}" for i in range(10)], "AF": [i % 2 for i in range(10)]})
    import pyarrow.parquet as pq

    pq.write_table(labels, tmp_path / "seg.labels.parquet")  # what `ecgfm segment` writes beside it
    beside = tmp_path / "seg.labels.parquet"
    with pytest.raises(LabelError, match=f"not a labels table: give its labels table, {beside}$"):
        load_labels(seg)
    assert load_labels(tmp_path / "seg.labels.parquet").labels == ["AF"]
    # a directory of segment shards with no labels table, and a segments file given as predictions
    shards = tmp_path / "shards"
    shards.mkdir()
    seg.rename(shards / "segments-s00000of00001-p00000.parquet")
    (shards / "_done-s00000of00001.json").write_text(
        '{"kind": "segments", "parts": ["segments-s00000of00001-p00000.parquet"]}')
    with pytest.raises(LabelError, match=f"^{shards}: holds segments .*, not a labels table$"):
        read_table(shards, kinds=("labels",))
    other = write_segments(tmp_path / "other.arrow", 4)
    with pytest.raises(LabelError, match="holds segments .*, not a predictions table$"):
        read_table(other, kinds=("predictions",))
    assert read_table(other, kinds=("segments",)).num_rows == 4  # asked for: read


def test_a_directory_of_labels_and_segments_read_without_a_kind_is_refused(tmp_path: Path) -> None:
    """A segments directory given where any table will do (evaluate's and ingest's user tables): its
    ``labels-*.parquet`` sorts before the segments, so checking only the first file let the segments through and
    they were concatenated to the labels, signal and all."""
    import pyarrow.parquet as pq

    from ecgfm_cli.labels import LabelError, read_table

    shards = tmp_path / "shards"
    shards.mkdir()
    write_segments(shards / "segments-s00000of00001-p00000.parquet", 4)
    pq.write_table(pa.table({"record_id": [f"rec{i:03d}" for i in range(4)], "AF": [0, 1, 0, 1]}),
                   shards / "labels-s00000of00001-p00000.parquet")
    (shards / "_done-s00000of00001.json").write_text('{"kind": "segments", "parts": '
                                                     '["segments-s00000of00001-p00000.parquet"]}')
    with pytest.raises(LabelError, match="holds segments"):
        read_table(shards)
    assert read_table(shards, kinds=("labels",)).column_names == ["record_id", "AF"]


def test_an_unmapped_stream_reads_each_batch_as_the_mapped_one(tmp_path: Path) -> None:
    """``open_table(memory_map=False)`` (the training loader) finds a saved stream's batches by their offsets and
    reads one when asked: the same batches as the mapped reader, dictionary-encoded columns included."""
    from ecgfm_cli.io.tables import open_table

    table = pa.table({"record_id": [f"r{i}" for i in range(10)], "x": list(range(10)),
                      "site": pa.array(["a", "b"] * 5).dictionary_encode()})
    for name, t in (("plain", table.drop(["site"])), ("dict", table)):
        path = tmp_path / f"{name}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, t.schema) as w:
            w.write_table(t, max_chunksize=3)
        with open_table(path) as mapped, open_table(path, memory_map=False) as unmapped:
            assert unmapped.format == "stream" and unmapped.num_groups == mapped.num_groups == 4
            for g in (3, 0, 2):
                assert unmapped.read_group(g).equals(mapped.read_group(g))
            assert unmapped.read().equals(t)


def test_a_damaged_labels_shard_in_a_directory_is_a_label_error(tmp_path: Path) -> None:
    """A cut labels shard in a directory raises LabelError as a cut labels file does, so the commands that name
    the labels table in their message (segment, probe) still can."""
    from ecgfm_cli.labels import LabelError, read_table

    d = tmp_path / "labels"
    d.mkdir()
    (d / "labels-0.parquet").write_bytes(b"PAR1" + b"\0" * 40)
    with pytest.raises(LabelError, match="labels-0.parquet"):
        read_table(d)
