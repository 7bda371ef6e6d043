"""Artifacts that cannot be half-read: cut streams, interrupted directories, two runs into one output, dead runs'
temporaries, foreign Parquet files and unsafe trainer states. Interruptions are real SIGKILLs of real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ecgfm_cli.io.artifacts import open_artifact

CLI = [sys.executable, "-m", "ecgfm_cli"]


def run_cli(*args, stdin: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], input=stdin, capture_output=True, timeout=300, cwd=cwd)


def start_cli(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *map(str, args)], stderr=subprocess.PIPE, **kw)


def started(run_file: Path) -> bool:
    """Whether a run has locked its output and recorded itself in ``run_file`` (the file exists a moment before
    the run's record is written into it)."""
    try:
        return b'"pid"' in run_file.read_bytes()
    except FileNotFoundError:
        return False


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def n_records(corpus: Path) -> int:
    return len(list(corpus.rglob("*.hea")))


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def corpus(sample_data: Path, tmp_path_factory) -> Path:
    """4 symlinked copies of the Challenge-2021 samples (88 real records): more than one ingest batch (64)."""
    root = tmp_path_factory.mktemp("corpus")
    for k in range(4):
        (root / f"c{k}").mkdir()
        for f in (sample_data / "challenge2021").iterdir():
            (root / f"c{k}" / f.name).symlink_to(f)
    return root


class Recorder:
    """A pipe reader that keeps every byte it hands on (pyarrow reads one IPC message at a time through it)."""

    def __init__(self, raw) -> None:
        self.raw, self.data = raw, bytearray()

    def read(self, n: int = -1) -> bytes:
        b = self.raw.read(n)
        self.data += b
        return b

    def readable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return False

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------- cut streams


@pytest.mark.parametrize("cut", ["between_messages", "mid_message"])
def test_killed_ingest_upstream_fails_segment_and_leaves_no_done_marker(corpus, tmp_path, cut):
    """`ingest | segment -o d/` with ingest SIGKILLed mid-way: segment fails with one line and writes no done
    marker, so a rerun redoes the shard. The test relays the pipe so that the kill lands exactly where wanted:
    right after a record batch (where pyarrow takes the EOF for the end of the stream), or inside the next one."""
    ingest = start_cli("ingest", corpus, stdout=subprocess.PIPE)
    relay = Recorder(ingest.stdout)
    source = pa.PythonFile(relay, mode="r")
    pa.ipc.read_message(source)  # the schema
    pa.ipc.read_message(source)  # the first 64 records
    if cut == "mid_message":
        relay.read(1000)
    stop(ingest)
    out = tmp_path / "d"
    seg = run_cli("segment", "-", "-o", out, stdin=bytes(relay.data))
    err = seg.stderr.decode()
    assert seg.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert ("end-of-stream marker" if cut == "between_messages" else "stops mid-way") in err
    assert not list(out.glob("_done-*"))
    # the rerun is not "already complete": it reads the whole input
    whole = subprocess.run(f"{' '.join(CLI)} ingest {corpus} | {' '.join(CLI)} segment - -o {out}", shell=True,
                           capture_output=True, timeout=300)
    assert whole.returncode == 0 and b"already complete" not in whole.stderr, whole.stderr.decode()
    kept = open_artifact(out, "labels").read_all(["record_id"]).num_rows
    assert kept + open_artifact(out, "rejects").read_all(["record_id"]).num_rows == n_records(corpus)
    assert open_artifact(out, "segments").num_rows() >= kept > 0


def test_a_complete_stream_still_reads_whole(corpus, tmp_path):
    stream = run_cli("ingest", corpus / "c0", "-o", "-")
    assert stream.returncode == 0
    seg = run_cli("segment", "-", "-o", tmp_path / "s.parquet", stdin=stream.stdout)
    assert seg.returncode == 0, seg.stderr.decode()
    assert pq.read_table(tmp_path / "s.labels.parquet").num_rows == n_records(corpus / "c0")


# ---------------------------------------------------------------------------------- interrupted directories


def test_interrupted_shard_run_is_refused_until_rerun(corpus, tmp_path):
    """`ingest --shard 1/3` SIGKILLed, 2/3 never run: segment and embed refuse the directory naming both shards
    and the rerun; --allow-partial reads what is there, with a warning; the named rerun completes it."""
    rec = tmp_path / "rec"
    assert run_cli("ingest", corpus, "-o", rec, "--shard", "0/3").returncode == 0
    killed = start_cli("ingest", corpus, "-o", rec, "--shard", "1/3", stdout=subprocess.DEVNULL)
    wait_for(lambda: started(rec / ".run-s00001of00003.json"), "shard 1 to start")
    stop(killed)
    seg = run_cli("segment", rec, "-o", tmp_path / "seg")
    err = seg.stderr.decode()
    assert seg.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert "shard 1/3 was interrupted" in err and "shard 2/3 has not been written" in err
    assert f"`ecgfm ingest {corpus} -o {rec} --shard 1/3`" in err and "--allow-partial" in err
    assert not (tmp_path / "seg").exists()
    partial = run_cli("segment", rec, "-o", tmp_path / "seg", "--allow-partial")
    assert partial.returncode == 0 and b"warning" in partial.stderr and b"incomplete" in partial.stderr
    for i in (1, 2):
        assert run_cli("ingest", corpus, "-o", rec, "--shard", f"{i}/3").returncode == 0
    assert run_cli("segment", rec, "-o", tmp_path / "seg2").returncode == 0
    assert open_artifact(rec, "records").read_all(["record_id"]).num_rows == n_records(corpus)


def test_killed_segment_output_is_refused_by_embed(corpus, tmp_path, capsys):
    """A `segment -o` killed mid-way leaves a directory that `embed` (and every reader) refuses; the segment rerun
    its message names completes it."""
    from tests.conftest import run_main

    rec = tmp_path / "rec"
    assert run_cli("ingest", corpus, "-o", rec).returncode == 0
    seg = tmp_path / "seg"
    killed = start_cli("segment", rec, "-o", seg, stdout=subprocess.DEVNULL)
    wait_for(lambda: started(seg / ".run-s00000of00001.json"), "segment to start")
    stop(killed)
    # a complete part left by the killed run (a long run finishes parts of 512 MB as it goes)
    from ecgfm_cli.io.artifacts import artifact_metadata
    from ecgfm_cli.io.schema import segments_schema

    empty = segments_schema(12, 2500).empty_table().replace_schema_metadata(artifact_metadata("segments"))
    pq.write_table(empty, seg / "segments-s00000of00001-p00000.parquet")
    code, err = run_main(capsys, "embed", seg, "-o", tmp_path / "e.parquet", "--random-init", "--preset", "tiny")
    assert code == 2 and "shard 0/1 was interrupted" in err and f"`ecgfm segment {rec} -o {seg}`" in err, err
    rerun = run_cli("segment", rec, "-o", seg)
    assert rerun.returncode == 0 and b"already complete" not in rerun.stderr
    assert open_artifact(seg, "segments").num_rows() > 0


def test_done_marker_must_match_the_parts(sample_data, tmp_path):
    rec = tmp_path / "rec"
    assert run_cli("ingest", sample_data / "challenge2021", "-o", rec).returncode == 0
    marker = json.loads((rec / "_done-s00000of00001.json").read_text())
    assert marker["command"].startswith("ecgfm ingest ") and marker["parts"]
    (rec / marker["parts"][0]).rename(rec / "records-s00000of00001-p00007.parquet")
    res = run_cli("segment", rec, "-o", tmp_path / "seg")
    assert res.returncode == 2 and b"lacks records-s00000of00001-p00000.parquet" in res.stderr
    # a hand-edited marker whose parts are not a list of names: one line, not a TypeError traceback
    (rec / "records-s00000of00001-p00007.parquet").rename(rec / marker["parts"][0])
    (rec / "_done-s00000of00001.json").write_text(json.dumps({**marker, "parts": 3}))
    res = run_cli("segment", rec, "-o", tmp_path / "seg")
    assert res.returncode == 2 and b"damaged done marker (_done-s00000of00001.json" in res.stderr
    assert b"Traceback" not in res.stderr


def test_a_shard_holding_no_file_is_complete(sample_data, tmp_path):
    """One file, two shards: the shard without a file finishes with a zero-row done marker, so the directory is
    whole (it used to have no marker at all, like a failed shard)."""
    one = sorted((sample_data / "challenge2021").glob("*.hea"))[0]
    for i in range(2):
        assert run_cli("ingest", one, "-o", tmp_path / "rec", "--shard", f"{i}/2").returncode == 0
    markers = [json.loads(p.read_text()) for p in sorted((tmp_path / "rec").glob("_done-*.json"))]
    assert sorted(m["records"] for m in markers) == [0, 1]
    assert run_cli("segment", tmp_path / "rec", "-o", tmp_path / "seg").returncode == 0


# ------------------------------------------------------------------------------------------ one run at a time


def test_second_run_into_the_same_output_is_refused(corpus, tmp_path):
    """Two `ingest -o same/` at once: the second is refused with one line naming the first (its pid); the first
    finishes whole. Two different shards of one directory run side by side without touching each other."""
    out = tmp_path / "same"
    first = start_cli("ingest", corpus, "-o", out, stdout=subprocess.DEVNULL)
    wait_for(lambda: started(out / ".run-s00000of00001.json"), "the first run to start")
    first.send_signal(signal.SIGSTOP)  # hold it mid-run, lock taken
    try:
        second = run_cli("ingest", corpus, "-o", out)
    finally:
        first.send_signal(signal.SIGCONT)
    err = second.stderr.decode()
    assert second.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert f"being written by another run (pid {first.pid}" in err
    assert first.wait(timeout=120) == 0
    assert open_artifact(out, "records").read_all(["record_id"]).num_rows == n_records(corpus)

    shards = tmp_path / "shards"
    a = start_cli("ingest", corpus, "-o", shards, "--shard", "0/2", stdout=subprocess.DEVNULL)
    wait_for(lambda: started(shards / ".run-s00000of00002.json"), "shard 0 to start")
    a.send_signal(signal.SIGSTOP)
    try:
        b = run_cli("ingest", corpus, "-o", shards, "--shard", "1/2")
    finally:
        a.send_signal(signal.SIGCONT)
    assert b.returncode == 0, b.stderr.decode()
    assert a.wait(timeout=120) == 0
    ids = open_artifact(shards, "records").read_all(["record_id"]).column(0).to_pylist()
    assert len(ids) == len(set(ids)) == n_records(corpus)


def test_single_file_outputs_are_locked_too(corpus, tmp_path):
    out = tmp_path / "r.parquet"
    first = start_cli("ingest", corpus, "-o", out, stdout=subprocess.DEVNULL)
    wait_for(lambda: (tmp_path / ".r.parquet.run.json").exists(), "the first run to start")
    first.send_signal(signal.SIGSTOP)
    try:
        second = run_cli("ingest", corpus / "c0", "-o", out)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and b"being written by another run" in second.stderr
    assert first.wait(timeout=120) == 0 and pq.read_table(out).num_rows == n_records(corpus)


# ------------------------------------------------------------------------------------ dead runs' temporaries


def test_rerun_removes_a_killed_runs_temporaries_only(corpus, tmp_path):
    out = tmp_path / "rec"
    killed = start_cli("ingest", corpus, "-o", out, stdout=subprocess.DEVNULL)
    wait_for(lambda: any(".tmp-" in p.name for p in out.glob(".*")), "a temporary part file")
    stop(killed)
    left = [p for p in out.glob(".*") if ".tmp-" in p.name]
    assert left and all(p.name.endswith(f".tmp-{killed.pid}") for p in left)
    live = out / f".records-s00000of00001-p00001.parquet.tmp-{os.getpid()}"  # a live process's: kept
    other = out / f".records-s00001of00002-p00000.parquet.tmp-{killed.pid}"  # another shard's: kept
    stranger = out / ".notes.tmp-1x"  # not our pattern: kept
    for p in (live, other, stranger):
        p.write_bytes(b"x")
    assert run_cli("ingest", corpus, "-o", out).returncode == 0
    assert not any(p.exists() for p in left)
    assert live.exists() and other.exists() and stranger.exists()


# ------------------------------------------------------------------------------------- foreign Parquet files


def test_wrong_schema_or_truncated_parquet_is_one_line(sample_data, tmp_path):
    pq.write_table(pa.table({"record_id": ["a"], "signal": [[0.0]]}), tmp_path / "other.parquet")
    res = run_cli("segment", tmp_path / "other.parquet", "-o", tmp_path / "seg")
    err = res.stderr.decode()
    assert res.returncode == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"{tmp_path / 'other.parquet'} is not a records artifact" in err and "sample_rate" in err
    rec = tmp_path / "rec"
    assert run_cli("ingest", sample_data / "challenge2021", "-o", rec).returncode == 0
    part = next(rec.glob("records-*.parquet"))
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    res = run_cli("segment", rec, "-o", tmp_path / "seg")
    err = res.stderr.decode()
    assert res.returncode == 2 and len(err.strip().splitlines()) == 1 and str(part) in err, err


def test_stream_of_another_shape_is_one_line(tmp_path):
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, pa.schema([("x", pa.int32())])) as w:
        w.write_table(pa.table({"x": pa.array([1], pa.int32())}))
    res = run_cli("segment", "-", "-o", tmp_path / "s.parquet", stdin=sink.getvalue().to_pybytes())
    assert res.returncode == 2 and b"stdin is not a records artifact" in res.stderr and b"Traceback" not in res.stderr


# ------------------------------------------------------------------------------------------ trainer states


def test_unsafe_trainer_state_is_one_line(tmp_path):
    import torch

    from ecgfm_cli.errors import EcgfmError
    from ecgfm_cli.train.pretrain import STATE_FILE, load_trainer_state

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save({"update": 1, "evil": Evil()}, tmp_path / STATE_FILE)
    with pytest.raises(EcgfmError, match=r"is not a safe trainer state.*unsupported GLOBAL \S*system"):
        load_trainer_state(tmp_path)
    assert not (tmp_path / "ran").exists()
    (tmp_path / STATE_FILE).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(EcgfmError, match="is not a readable trainer state"):
        load_trainer_state(tmp_path)
    torch.save({"update": 1}, tmp_path / STATE_FILE)
    with pytest.raises(EcgfmError, match="lacks data, optimizer, rng"):
        load_trainer_state(tmp_path)


def test_label_tables_of_an_incomplete_directory_or_a_cut_stream_are_refused(sample_data, tmp_path, monkeypatch):
    """`probe`/`finetune --labels DIR` and `--labels -` read through labels.read_table: the same refusals."""
    import io

    from ecgfm_cli.errors import EcgfmError
    from ecgfm_cli.labels import read_table

    rec = tmp_path / "rec"
    assert run_cli("ingest", sample_data / "challenge2021", "-o", rec).returncode == 0
    assert read_table(rec, kinds=("labels",)).num_rows == n_records(sample_data / "challenge2021")
    (rec / "_done-s00000of00001.json").unlink()
    with pytest.raises(EcgfmError, match="is incomplete: shard 0/1 was interrupted"):
        read_table(rec, kinds=("labels",))
    sink = io.BytesIO()
    writer = pa.ipc.new_stream(sink, pa.schema([("record_id", pa.string())]))
    writer.write_table(pa.table({"record_id": ["a"]}))  # no close(): no end-of-stream marker
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(sink.getvalue()))))
    with pytest.raises(EcgfmError, match="without its end-of-stream marker"):
        read_table("-")


def test_allow_partial_lasts_one_command(sample_data, tmp_path, capsys):
    from ecgfm_cli.io.artifacts import ALLOW_PARTIAL_ENV
    from tests.conftest import run_main

    rec = tmp_path / "rec"
    assert run_main(capsys, "ingest", sample_data / "challenge2021", "-o", rec)[0] == 0
    (rec / "_done-s00000of00001.json").unlink()
    code, err = run_main(capsys, "segment", rec, "-o", tmp_path / "a", "--allow-partial")
    assert code == 0 and "warning" in err and ALLOW_PARTIAL_ENV not in os.environ
    code, err = run_main(capsys, "segment", rec, "-o", tmp_path / "b")
    assert code == 2 and f"complete it with `ecgfm ingest {sample_data / 'challenge2021'} -o {rec}`" in err


@pytest.mark.slow
def test_pretrain_killed_after_a_checkpoint_resumes_without_a_gap(sample_data, tmp_path):
    """A real SIGKILL of `pretrain` once checkpoint-2 exists: `--resume` continues from the last complete
    checkpoint to the end, one log line per update, nothing repeated or missing."""
    from ecgfm_cli.train.runs import read_log

    assert run_cli("ingest", sample_data / "challenge2021", "-o", tmp_path / "rec").returncode == 0
    assert run_cli("segment", tmp_path / "rec", "-o", tmp_path / "seg").returncode == 0
    run = tmp_path / "run"
    train = start_cli("pretrain", tmp_path / "seg", "-o", run, "--preset", "tiny", "--batch-size", "8",
                      "--num-negatives", "20", "--log-every", "1", "--save-every", "1", "--max-updates", "5",
                      stdout=subprocess.DEVNULL)
    wait_for(lambda: (run / "checkpoint-2").is_dir() or train.poll() is not None, "checkpoint-2", timeout=240)
    stop(train)
    assert train.returncode == -signal.SIGKILL, "pretrain finished before it could be killed"
    resumed = run_cli("pretrain", tmp_path / "seg", "-o", run, "--resume", "--log-every", "1")
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert [e["update"] for e in read_log(run)] == [1, 2, 3, 4, 5]
    assert (run / "checkpoint-5").is_dir()


def test_a_file_output_beside_its_twin_in_the_other_format_is_refused(sample_data, tmp_path):
    """`-o rec.arrow` beside an existing `rec.parquet`: both would own `rec.labels.parquet` and
    `rec.rejects.parquet`, so the second run overwrote the first's labels. It is refused before any work, naming
    the twin; the first artifact's companions are untouched. Rewriting the same file stays allowed."""
    src = sample_data / "challenge2021"
    assert run_cli("ingest", src, "-o", tmp_path / "rec.parquet").returncode == 0
    labels = (tmp_path / "rec.labels.parquet").read_bytes()
    res = run_cli("ingest", src, "-o", tmp_path / "rec.arrow")
    err = res.stderr.decode()
    assert res.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert "rec.parquet is beside it" in err and not (tmp_path / "rec.arrow").exists()
    assert (tmp_path / "rec.labels.parquet").read_bytes() == labels
    res = run_cli("segment", tmp_path / "rec.parquet", "-o", tmp_path / "rec.feather")
    assert res.returncode == 2 and b"rec.parquet is beside it" in res.stderr
    assert run_cli("ingest", src, "-o", tmp_path / "rec.parquet").returncode == 0
