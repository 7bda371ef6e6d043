"""`ecgfm ingest` and `ecgfm segment` driven through the CLI, on the committed sample records."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ecgfm_cli.cli import app
from ecgfm_cli.contract import Contract
from ecgfm_cli.io.artifacts import open_artifact

runner = CliRunner()


def invoke(*args: str, input: bytes | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ecgfm_cli", *map(str, args)], input=stdin,
                          capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def records_dir(sample_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ingest") / "records"
    res = invoke("ingest", sample_data, "--fs", "500", "-o", out)
    assert res.exit_code == 0, res.output
    return out


def table(path: Path, kind: str) -> pa.Table:
    return open_artifact(path, kind).read_all()


#: the sample records: 41 from the open datasets plus 7 hospital-format files (GE MUSE 1, Philips 2, HL7 aECG 1,
#: DICOM 1, SCP-ECG 2); see sample_data/ATTRIBUTION.md
SAMPLE_RECORDS = 48


def test_ingest_reads_every_sample_source(records_dir):
    t = table(records_dir, "records")
    formats = set(t.column("source_format").to_pylist())
    assert {"wfdb-mat", "wfdb", "csv", "sph-hdf5", "fairseq-mat"} <= formats, formats
    ids = t.column("record_id").to_pylist()
    assert len(ids) == len(set(ids)) == SAMPLE_RECORDS
    row = t.filter(pc.equal(t.column("record_id"), "challenge2021/A0003")).to_pylist()[0]
    assert row["sample_rate"] == 500 and row["n_leads"] == 12 and row["sex"] in ("M", "F")
    assert "164889003" in row["dx_codes"]  # atrial fibrillation
    assert len(row["signal"]) == 12 * row["n_samples"] and row["units"][0] == "mV"
    ptbxl = [i for i in ids if i.startswith("ptbxl/")]
    assert len(ptbxl) == 6  # 500 Hz and 100 Hz versions stay distinct records
    labels = table(records_dir, "labels")
    assert labels.num_rows == SAMPLE_RECORDS and set(labels.column_names) >= {"record_id", "patient_id", "codes"}
    rejects = table(records_dir, "rejects")  # nothing but the documents beside the records (licenses, README)
    assert set(rejects.column("reason").to_pylist()) <= {"ignored"}, rejects.to_pylist()
    done = json.loads((records_dir / "_done-s00000of00001.json").read_text())
    assert done["records"] == SAMPLE_RECORDS


def test_ingest_values_equal_wfdb(records_dir, sample_data):
    import wfdb

    t = table(records_dir, "records")
    for rid in ("challenge2021/JS00001", "ptbxl/records100/00000/00841_lr", "code15_wfdb/1111"):
        row = t.filter(pc.equal(t.column("record_id"), rid)).to_pylist()[0]
        ref = wfdb.rdsamp(str(sample_data / rid))[0].T
        got = np.asarray(row["signal"], dtype=np.float32).reshape(row["n_leads"], row["n_samples"])
        np.testing.assert_array_equal(got, ref.astype(np.float32))


def test_pipe_ingest_into_segment(sample_data, tmp_path):
    ing = run_cli("ingest", sample_data / "challenge2021", sample_data / "code15_wfdb")
    assert ing.returncode == 0, ing.stderr.decode()
    assert b"22 records" in ing.stderr or b"26 records" in ing.stderr
    seg = run_cli("segment", "-", "-o", tmp_path / "seg", stdin=ing.stdout)
    assert seg.returncode == 0, seg.stderr.decode()
    reader = open_artifact(tmp_path / "seg", "segments")
    assert Contract.from_json(reader.metadata["ecgfm.contract"]) == Contract()
    t = reader.read_all()
    assert t.schema.field("signal").type.list_size == 12 * 2500
    code15 = t.filter(pc.starts_with(t.column("record_id"), "1111")).to_pylist()
    assert code15, "400 Hz CODE-15 records are segmented"
    # 2934 samples at 400 Hz -> 3667 at 500 Hz -> one window; 4096 -> 5120 -> two
    assert {r["segment_index"] for r in code15} <= {0, 1}
    # segment and embed read stdin when no input is named, as a pipe's next command does
    seg2 = run_cli("segment", stdin=ing.stdout)
    emb = run_cli("embed", "--random-init", "--preset", "tiny", "-o", tmp_path / "e.npz", stdin=seg2.stdout)
    assert emb.returncode == 0, emb.stderr.decode()
    assert len(np.load(tmp_path / "e.npz")["embedding"]) == t.num_rows
    # a Parquet file piped in is named for what it is
    parquet = run_cli("embed", "--random-init", "--preset", "tiny", "-o", tmp_path / "f.npz",
                      stdin=next((tmp_path / "seg").glob("segments-*.parquet")).read_bytes())
    assert parquet.returncode == 2 and b"stdin holds a Parquet file" in parquet.stderr


def test_segment_matches_ecgfm_reference_through_cli(sample_data, tmp_path):
    import scipy.io as sio

    out = tmp_path / "seg.parquet"
    ing = run_cli("ingest", sample_data / "ecgfm_reference" / "org")
    seg = run_cli("segment", "-o", out, stdin=ing.stdout)
    assert seg.returncode == 0, seg.stderr.decode()
    rows = pq.read_table(out).to_pylist()
    assert [r["segment_index"] for r in rows] == [0, 1]
    for r in rows:
        ref = sio.loadmat(sample_data / "ecgfm_reference" / "segmented" / f"code_15_1594286_{r['segment_index']}.mat")
        got = np.asarray(r["signal"], dtype=np.float32).reshape(12, 2500)
        assert np.abs(ref["feats"] - got).max() <= 1e-4


def test_segment_options_float16_stride_pad_leadmap(records_dir, tmp_path):
    res = invoke("segment", records_dir, "-o", tmp_path / "s16.parquet", "--dtype", "float16", "--stride", "2.5")
    assert res.exit_code == 0, res.output
    t = pq.read_table(tmp_path / "s16.parquet")
    assert t.schema.field("signal").type.value_type == pa.float16()
    row = t.filter(pc.equal(t.column("record_id"), "challenge2021/A0002")).to_pylist()
    assert [r["start_sample"] for r in row] == [0, 1250, 2500]  # 10 s record, 2.5 s stride
    # cpsc2021 is two-lead: the other ten are zero-filled and flagged
    cp = t.filter(pc.starts_with(t.column("record_id"), "cpsc2021")).to_pylist()[0]
    assert cp["lead_present"] == [True, True] + [False] * 10


def test_segment_worker_processes_write_what_one_process_writes(records_dir, tmp_path):
    one = invoke("segment", records_dir, "-o", tmp_path / "one")
    assert one.exit_code == 0, one.output
    two = invoke("segment", records_dir, "-o", tmp_path / "two", "--workers", "2")
    assert two.exit_code == 0, two.output
    assert table(tmp_path / "two", "segments").equals(table(tmp_path / "one", "segments"))


def test_single_lead_csv_needs_lead_map(tmp_path):
    rng = np.random.default_rng(0)
    np.savetxt(tmp_path / "holter.csv", rng.standard_normal((3000, 1)), delimiter=",", header="ECG", comments="")
    rec = tmp_path / "rec.parquet"
    assert invoke("ingest", tmp_path / "holter.csv", "--fs", "250", "-o", rec).exit_code == 0
    res = run_cli("segment", rec, "-o", tmp_path / "a.parquet")
    assert res.returncode == 2 and b"unknown_lead" in res.stderr
    rejects = pq.read_table(tmp_path / "a.rejects.parquet").to_pylist()
    assert rejects[0]["reason"] == "unknown_lead" and "--lead-map" in rejects[0]["detail"]
    res = run_cli("segment", rec, "-o", tmp_path / "b.parquet", "--lead-map", "ECG=I")
    assert res.returncode == 0, res.stderr.decode()
    rows = pq.read_table(tmp_path / "b.parquet").to_pylist()
    assert len(rows) == 2 and rows[0]["lead_present"] == [True] + [False] * 11


def test_bad_inputs_are_rejected_with_reasons_and_run_continues(sample_data, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(sample_data / "challenge2021" / "A0002.hea", src)
    shutil.copy(sample_data / "challenge2021" / "A0002.mat", src)
    (src / "broken.hea").write_text("broken 1 500 5000\nbroken.dat 16 1000/mV 16 0 0 0 0 I\n")  # no .dat
    (src / "short.hea").write_text("short 1 500 5000\nshort.dat 16 1000/mV 16 0 0 0 0 I\n")
    (src / "short.dat").write_bytes(b"\0" * 100)
    (src / "zero.hea").write_text("zero 1 0 10\nzero.dat 16 1000/mV 16 0 0 0 0 I\n")
    (src / "zero.dat").write_bytes(b"\0" * 20)
    (src / "notes.csv").write_text("hello,world\nfoo,bar\n")
    out = tmp_path / "rec"
    res = run_cli("ingest", src, "-o", out)
    assert res.returncode == 0, res.stderr.decode()
    assert b"1 record from" in res.stderr and b"4 skipped" in res.stderr
    reasons = {r["source_path"].rsplit("/", 1)[-1]: r["reason"] for r in table(out, "rejects").to_pylist()}
    assert reasons == {"broken.hea": "missing_data", "short.hea": "size_mismatch", "zero.hea": "bad_sample_rate",
                       "notes.csv": "not_ecg"}, reasons
    # the same with reader processes: rejects cross the process boundary whole (this once hung)
    pooled = run_cli("ingest", src, "-o", tmp_path / "pooled", "--workers", "2")
    assert pooled.returncode == 0 and b"4 skipped" in pooled.stderr, pooled.stderr.decode()
    assert table(tmp_path / "pooled", "rejects").to_pylist() == table(out, "rejects").to_pylist()
    strict = run_cli("ingest", src, "-o", tmp_path / "strict", "--strict")
    assert strict.returncode == 1
    nothing = run_cli("ingest", src / "notes.csv", "-o", tmp_path / "none")
    assert nothing.returncode == 2 and b"no record was read" in nothing.stderr


def test_output_extension_decides_format_and_is_checked_first(sample_data, tmp_path):
    res = run_cli("ingest", sample_data / "sph", "-o", tmp_path / "x.csv")
    assert res.returncode == 2 and b"unknown extension" in res.stderr
    assert not (tmp_path / "x.csv").exists()
    res = run_cli("ingest", sample_data / "sph", "-o", tmp_path / "x.npz")
    assert res.returncode == 2 and b"does not write" in res.stderr
    res = run_cli("ingest", sample_data / "sph", "-o", tmp_path / "r.arrow")
    assert res.returncode == 0
    assert open_artifact(tmp_path / "r.arrow", "records").read_all().num_rows == 2
    # binary is never written to a terminal: the CLI checks isatty (CliRunner's stdout is not one)
    wrong = run_cli("segment", tmp_path / "r.arrow", "-o", tmp_path / "seg")
    assert wrong.returncode == 0
    again = run_cli("segment", tmp_path / "seg", "-o", tmp_path / "seg2")
    assert again.returncode == 2 and b"holds no records" in again.stderr


def test_shards_partition_and_rerun_skips_finished(sample_data, tmp_path):
    out = tmp_path / "sharded"
    for i in range(3):
        res = invoke("ingest", sample_data, "--fs", "500", "-o", out, "--shard", f"{i}/3")
        assert res.exit_code == 0, res.output
    ids = table(out, "records").column("record_id").to_pylist()
    assert len(ids) == len(set(ids)) == SAMPLE_RECORDS
    part = next(out.glob("records-s00001of00003-*.parquet"))
    mtime = part.stat().st_mtime_ns
    res = run_cli("ingest", sample_data, "--fs", "500", "-o", out, "--shard", "1/3")
    assert res.returncode == 0 and b"already complete" in res.stderr and part.stat().st_mtime_ns == mtime
    # an interrupted shard (no done marker) is redone from scratch, never appended to
    (out / "_done-s00002of00003.json").unlink()
    assert invoke("ingest", sample_data, "--fs", "500", "-o", out, "--shard", "2/3").exit_code == 0
    assert table(out, "records").num_rows == SAMPLE_RECORDS


def test_failed_or_foreign_outputs_are_not_taken_for_finished(sample_data, tmp_path):
    """A run that wrote nothing leaves no done-marker (and no empty file); a directory holding another command's
    artifact is refused instead of being mixed with (embed: cleared into) the new one; an all-rejected input
    names the most common reason with its detail."""
    out = tmp_path / "rec"
    failed = run_cli("ingest", sample_data / "cinc2011", "-o", out)  # CSV tables need --fs
    assert failed.returncode == 2 and b"every file was rejected, e.g. bad_sample_rate" in failed.stderr
    assert b"--fs" in failed.stderr and not list(out.glob("_done-*"))
    assert run_cli("ingest", sample_data / "cinc2011", "-o", tmp_path / "x.parquet").returncode == 2
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "x.labels.parquet").exists()
    assert (tmp_path / "x.rejects.parquet").exists()  # says why
    fixed = run_cli("ingest", sample_data / "cinc2011", "--fs", "500", "-o", out)
    assert fixed.returncode == 0 and table(out, "records").num_rows > 0
    into_records = run_cli("segment", out, "-o", out)
    assert into_records.returncode == 2 and b"already holds records" in into_records.stderr
    assert table(out, "records").num_rows > 0


def test_shards_of_named_files_overlapping_paths_and_early_checks(sample_data, tmp_path):
    heads = sorted((sample_data / "challenge2021").glob("*.hea"))
    per_shard = []
    for i in range(3):  # files named one by one hash by name: they spread over the shards
        res = run_cli("ingest", *heads, "-o", tmp_path / "named", "--shard", f"{i}/3")
        assert res.returncode == 0, res.stderr.decode()
        per_shard.append(len(list((tmp_path / "named").glob(f"records-s0000{i}of00003-*.parquet"))))
    assert sum(1 for n in per_shard if n) >= 2
    assert table(tmp_path / "named", "records").num_rows == len(heads)
    # one file, two shards: one of them holds nothing, which is not an error in a job array
    runs = [run_cli("ingest", heads[0], "-o", tmp_path / "one", "--shard", f"{i}/2") for i in range(2)]
    assert [r.returncode for r in runs] == [0, 0]
    assert sum(b"holds none of the 1 files found" in r.stderr for r in runs) == 1
    twice = run_cli("ingest", sample_data / "ptbxl", sample_data / "ptbxl" / "records500", "-o", tmp_path / "t.parquet")
    assert twice.returncode == 0 and b"named twice by overlapping paths" in twice.stderr
    assert run_cli("ingest", sample_data / "ptbxl", "-o", tmp_path / "once.parquet").returncode == 0
    ids = table(tmp_path / "t.parquet", "records").column("record_id").to_pylist()
    assert len(ids) == len(set(ids)) == table(tmp_path / "once.parquet", "records").num_rows
    # symlinked copies in two folders are two records (the same path reached twice is one)
    for sub in ("a", "b"):
        (tmp_path / "corpus" / sub).mkdir(parents=True)
        for f in (sample_data / "challenge2021").glob("A0001.*"):
            (tmp_path / "corpus" / sub / f.name).symlink_to(f)
    both = run_cli("ingest", tmp_path / "corpus", "-o", tmp_path / "both.parquet")
    assert both.returncode == 0 and b"named twice" not in both.stderr
    assert table(tmp_path / "both.parquet", "records").column("record_id").to_pylist() == ["a/A0001", "b/A0001"]
    (tmp_path / "nokey.csv").write_text("name,AF\nx,1\n")
    nokey = run_cli("ingest", sample_data / "ptbxl", "--labels", tmp_path / "nokey.csv", "-o", tmp_path / "nk")
    assert nokey.returncode == 2 and b"needs a record_id" in nokey.stderr and not (tmp_path / "nk").exists()
    rej = run_cli("ingest", sample_data / "ptbxl", "-o", tmp_path / "r", "--shard", "0/2", "--rejects", tmp_path / "x")
    assert rej.returncode == 2 and b"--rejects with --shard" in rej.stderr
    seg = run_cli("segment", tmp_path / "t.parquet", "-o", tmp_path / "s", "--shard", "0/2")
    assert seg.returncode == 2 and b"give a records directory as input" in seg.stderr


def test_interrupted_writer_leaves_no_readable_file(tmp_path):
    from ecgfm_cli.io.artifacts import ArtifactWriter, Output
    from ecgfm_cli.io.schema import REJECTS

    w = ArtifactWriter(Output("dir", tmp_path), "rejects", REJECTS)
    w.write(pa.Table.from_pylist([{"stage": "x", "source_path": "p", "record_id": None, "reason": "r",
                                   "detail": "d"}], schema=REJECTS))
    assert not list(tmp_path.glob("rejects-*.parquet"))  # only a hidden temporary exists mid-write
    w.abort()
    assert not list(tmp_path.iterdir())


def test_interrupted_stream_fails_downstream(tmp_path, monkeypatch):
    """A writer that gives up mid-stream leaves the stream visibly cut: the reader fails with one line instead of
    taking the rows so far for the whole input."""
    import io

    from ecgfm_cli.errors import EcgfmError
    from ecgfm_cli.io.artifacts import ArtifactWriter, Output
    from ecgfm_cli.io.schema import REJECTS

    row = {"stage": "x", "source_path": "p", "record_id": None, "reason": "r", "detail": "d"}
    buf = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(buf))
    w = ArtifactWriter(Output("stream", None), "rejects", REJECTS)
    w.write(pa.Table.from_pylist([row], schema=REJECTS))
    w.abort()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(buf.getvalue()))))
    reader = open_artifact("-", "rejects", "test")
    with pytest.raises(EcgfmError, match="stops mid-way"):
        reader.read_all()


def test_user_labels_joined(sample_data, tmp_path):
    (tmp_path / "mine.csv").write_text("record_id,patient_id,lvef\nSPH00001,p1,55\nSPH00007,p2,30\nnope,p3,1\n")
    out = tmp_path / "rec"
    res = run_cli("ingest", sample_data / "sph", "-o", out, "--labels", tmp_path / "mine.csv")
    assert res.returncode == 0 and b"1 of 3 rows" in res.stderr
    rows = {r["record_id"]: (r["lvef"], r["patient_id"]) for r in table(out, "labels").to_pylist()}
    assert rows == {"SPH00001": (55, "p1"), "SPH00007": (30, "p2")}  # the user's patient ids are kept


def test_stated_yes_no_labels_keep_their_negatives(sample_data, tmp_path):
    """`# Chagas label: False` is a known negative: a column of its own (codes can only list positives), which
    probe takes without a label map."""
    from ecgfm_cli.labels import load_labels

    out = tmp_path / "rec"
    assert run_cli("ingest", sample_data / "code15_wfdb", "-o", out).returncode == 0
    labels = load_labels(out)
    assert labels.labels == ["chagas"] and sorted(labels.values[:, 0].tolist()) == [0.0, 0.0, 0.0, 1.0]
    assert any("'codes' column is not used" in n for n in labels.notes)


def test_data_commands_do_not_import_torch(sample_data, tmp_path):
    script = f"""
import sys
from ecgfm_cli.cli import main
for argv in (['ingest', {str(sample_data / "sph")!r}, '-o', {str(tmp_path / "r")!r}],
             ['segment', {str(tmp_path / "r")!r}, '-o', {str(tmp_path / "s")!r}]):
    sys.argv = ['ecgfm', *argv]
    try:
        main()
    except SystemExit as e:
        assert e.code == 0, e.code
assert 'torch' not in sys.modules, 'torch imported'
print('ok')
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "ok", res.stderr
    helps = subprocess.run([sys.executable, "-c", "import sys; import ecgfm_cli.cli; "
                            "print(sorted(m for m in ('torch','sklearn','pyarrow','matplotlib') if m in sys.modules))"],
                           capture_output=True, text=True)
    assert helps.stdout.strip() == "[]", helps.stdout + helps.stderr


def test_exam_table_labels_join_on_study_id(sample_data, tmp_path):
    # CODE-15%'s exams.csv names exams, not files: joined through the headers' Exam ID
    (tmp_path / "exams.csv").write_text("exam_id,AF,RBBB\n1111,0,1\n1111004,1,0\n")
    out = tmp_path / "rec"
    res = run_cli("ingest", sample_data / "code15_wfdb", "-o", out, "--labels", tmp_path / "exams.csv")
    assert res.returncode == 0, res.stderr.decode()
    rows = {r["record_id"]: (r["study_id"], r["AF"], r["RBBB"]) for r in table(out, "labels").to_pylist()}
    assert rows["1111"] == ("1111", 0, 1) and rows["1111004"] == ("1111004", 1, 0)
    assert sum(v[1] is None for v in rows.values()) == 2


def test_binary_never_written_to_a_terminal(sample_data):
    import os
    import pty

    primary, secondary = pty.openpty()
    try:
        res = subprocess.run([sys.executable, "-m", "ecgfm_cli", "ingest", str(sample_data / "sph")],
                             stdout=secondary, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(secondary)
    os.set_blocking(primary, False)
    try:
        written = os.read(primary, 4096)
    except (BlockingIOError, OSError):
        written = b""
    os.close(primary)
    assert res.returncode == 2 and b"stdout is a terminal" in res.stderr
    assert written == b""


@pytest.mark.parametrize("args, message", [
    (("segment", "--bogus"), "No such option"),
    (("nosuchcmd",), "No such command"),
    (("ingest", "sample", "--workers", "0"), "--workers"),
    (("pretrain", "segs", "--lr", "-1"), "Invalid value for '--lr'"),
])
def test_usage_errors_are_one_line_without_traceback(capsys, args, message):
    """The real entry point turns click's usage errors (typer's vendored click included) into exit 2 and a short
    message, never a traceback."""
    from conftest import run_main

    code, err = run_main(capsys, *args)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("ecgfm") and "--help`" in err, err  # one line, with a pointer


def test_worker_pool_keeps_order_and_pulls_input_lazily():
    """ingest/segment --workers: results in input order, and the input is pulled only a few items ahead (a pool
    that drained it would hold a whole records artifact in memory)."""
    from ecgfm_cli.parallel import ordered_map

    pulled: list[int] = []

    def items():
        for i in range(-50, 50):
            pulled.append(i)
            yield i

    results = ordered_map(abs, items(), workers=2)
    assert next(results) == 50 and len(pulled) <= 4
    assert list(results) == [abs(i) for i in range(-49, 50)]


def test_closed_pipe_ends_quietly_like_other_tools(sample_data):
    """`ecgfm ingest ... | head -c 100`: exit status 141 (SIGPIPE's, what the shell reports for other tools) and
    no traceback. All the sample records: several MB, more than the 1 MiB pipe buffer ingest asks for."""
    p = subprocess.Popen([sys.executable, "-m", "ecgfm_cli", "ingest", str(sample_data), "--fs", "500", "-o", "-"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(100)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 141 and b"Traceback" not in err, err.decode()
