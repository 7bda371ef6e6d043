"""`ecgfm ingest` discovery: every file found is read, read with a record, or listed with a reason (issue #16)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import run_main
from typer.testing import CliRunner

from ecgfm_cli.cli import app
from ecgfm_cli.io.readers import DEFAULT_MAX_SAMPLES, PATH_MAX, ReadOptions, discover

runner = CliRunner()
PTBXL_LR = Path("records100") / "00000" / "00841_lr"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def ingest_process(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real command in a process of its own (a hang fails the test instead of blocking the suite)."""
    return subprocess.run([sys.executable, "-m", "ecgfm_cli", "ingest", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


class Result:
    def __init__(self, code: int, stderr: str):
        self.returncode, self.stderr = code, stderr


@pytest.fixture
def ingest(capsys):
    """``ingest(*args)``: the real entry point in-process -> .returncode, .stderr."""
    return lambda *args: Result(*run_main(capsys, "ingest", *args))


def copy_record(sample_data: Path, rel: Path, dest: Path, stem: str | None = None) -> Path:
    """Copy a WFDB record (header + .dat) into ``dest``, renamed to ``stem`` (the header's names follow)."""
    dest.mkdir(parents=True, exist_ok=True)
    src = sample_data / "ptbxl" / rel
    stem = stem or src.name
    text = (src.with_suffix(".hea")).read_text().replace(src.name, stem)
    (dest / f"{stem}.hea").write_text(text)
    shutil.copy(src.with_suffix(".dat"), dest / f"{stem}.dat")
    return dest / f"{stem}.hea"


def rejects_of(out: Path) -> list[dict]:
    return pq.read_table(out.with_name(out.stem + ".rejects.parquet")).to_pylist()


def records_of(out: Path, columns=("record_id", "patient_id", "study_id", "source_path")) -> list[dict]:
    return pq.read_table(out, columns=list(columns)).to_pylist()


# ----------------------------------------------------------------------------------------- #16.5 accounting

def test_every_file_found_is_read_a_companion_or_listed(sample_data, tmp_path, ingest):
    data = tmp_path / "data"
    copy_record(sample_data, PTBXL_LR, data, "rec")
    (data / "rec.atr").write_bytes(b"\0\0")  # the record's annotation: read with it
    (data / "README.md").write_text("about this data")
    (data / "plot.png").write_bytes(b"\x89PNG")
    (data / "lonely.atr").write_bytes(b"\0\0")  # an annotation without its record
    (data / "bundle.zip").write_bytes(b"PK\3\4")
    out = tmp_path / "r.parquet"
    res = ingest(data, "-o", out)
    assert res.returncode == 0, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    # 7 files: 1 record file read, 2 read with it (rec.dat, rec.atr), 1 rejected, 3 ignored
    assert "1 record from 2 files (+2 read with them" in line, line
    assert "1 skipped (not_ecg 1)" in line and "3 other files ignored (README.md, lonely.atr, plot.png)" in line, line
    rows = {Path(r["source_path"]).name: (r["reason"], r["detail"]) for r in rejects_of(out)}
    assert set(rows) == {"bundle.zip", "README.md", "lonely.atr", "plot.png"}, rows
    assert rows["README.md"] == ("ignored", "README.md: a document, not an ECG record")
    assert rows["plot.png"][1] == "plot.png: an image, not an ECG record"
    assert rows["bundle.zip"][0] == "not_ecg"
    # --strict is about records that could not be read, not about a README beside them
    assert ingest(data / "rec.hea", data / "README.md", "-o", tmp_path / "s.parquet", "--strict").returncode == 1
    only_docs = ingest(data / "rec.hea", "-o", tmp_path / "t.parquet", "--strict")
    assert only_docs.returncode == 0, only_docs.stderr


def test_a_stream_lists_rejects_on_stderr_but_counts_documents(sample_data, tmp_path):
    """`ingest DIR | ...` has no rejects table: real rejects are listed one per line, the documents beside the
    records are only counted in the summary (a dataset's README and LICENSE files are not news)."""
    folder = tmp_path / "data"
    copy_record(sample_data, PTBXL_LR, folder)
    (folder / "README.md").write_text("about this dataset\n")
    (folder / "bad.hea").write_text("bad 12 500\n")
    r = subprocess.run([sys.executable, "-m", "ecgfm_cli", "ingest", str(folder), "-o", "-"], capture_output=True,
                       timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "skipped bad:" in err
    assert "skipped README" not in err
    assert "1 other file ignored (README.md)" in err


def test_cpsc_mat_beside_a_wfdb_record_of_the_same_name_is_read(sample_data, tmp_path, ingest):
    """``bad.hea`` + ``bad.dat`` beside a CPSC-2018 ``bad.mat``: the .mat was silently taken as the header's signal
    file. It is read on its own; its record_id is the header's, so it is listed as duplicate_record_id."""
    import scipy.io

    data = tmp_path / "data"
    copy_record(sample_data, PTBXL_LR, data, "bad")
    x = np.random.default_rng(0).normal(size=(12, 5000)).astype(np.float64)
    scipy.io.savemat(data / "bad.mat", {"ECG": {"sex": "Male", "age": 60, "data": x}})
    scipy.io.savemat(data / "other.mat", {"ECG": {"sex": "Female", "age": 50, "data": x}})
    out = tmp_path / "r.parquet"
    res = ingest(data, "-o", out)
    assert res.returncode == 0, res.stderr
    assert sorted(r["record_id"] for r in records_of(out)) == ["bad", "other"]
    assert "2 records from 3 files (+1 read with them" in res.stderr  # bad.dat is bad.hea's; bad.mat is a record
    (rej,) = rejects_of(out)
    assert (Path(rej["source_path"]).name, rej["reason"]) == ("bad.mat", "duplicate_record_id"), rej
    # named on its own, the .mat is read as CPSC, not through the unrelated header beside it
    res = ingest(data / "bad.mat", "-o", tmp_path / "m.parquet")
    assert res.returncode == 0, res.stderr
    assert pq.read_table(tmp_path / "m.parquet").column("source_format").to_pylist() == ["cpsc-mat"]


def test_a_dat_its_header_does_not_name_is_reported(sample_data, tmp_path, ingest):
    hea = copy_record(sample_data, PTBXL_LR, tmp_path / "data", "rec")
    os.rename(hea.with_suffix(".dat"), hea.with_name("signals.dat"))
    hea.write_text(hea.read_text().replace("rec.dat", "signals.dat"))
    (hea.with_name("rec.dat")).write_bytes(b"\0" * 64)  # same stem, but the header reads signals.dat
    out = tmp_path / "r.parquet"
    assert ingest(tmp_path / "data", "-o", out).returncode == 0
    (rej,) = rejects_of(out)
    assert rej["reason"] == "not_ecg"
    assert "rec.dat: a signal file that its header rec.hea does not name" in rej["detail"]


def _mkdirs_past_path_max(top: Path) -> Path:
    """``top/ddd.../ddd.../...`` deeper than PATH_MAX, made through directory descriptors; returns the path."""
    name = "d" * 250
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    path = top
    try:
        while len(os.fsencode(path)) < PATH_MAX + 300:
            os.mkdir(name, dir_fd=fd)
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
            path = path / name
        for fname in ("deep.hea", "deep.dat"):
            os.close(os.open(fname, os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    finally:
        os.close(fd)
    return path


def test_a_path_past_path_max_is_a_reject_not_a_silent_loss(sample_data, tmp_path, ingest):
    copy_record(sample_data, PTBXL_LR, tmp_path / "data", "ok")
    deep = _mkdirs_past_path_max(tmp_path / "data")
    out = tmp_path / "r.parquet"
    res = ingest(tmp_path / "data", "-o", out)
    assert res.returncode == 0, res.stderr
    assert [r["record_id"] for r in records_of(out)] == ["ok"]
    (rej,) = rejects_of(out)
    assert rej["reason"] == "path_too_long" and rej["source_path"] == str(deep / "deep.hea"), rej
    assert "1 skipped (path_too_long 1)" in res.stderr


# ----------------------------------------------------------------------------------------- #16.7 names, FIFOs

def test_non_utf8_file_name_is_a_reject_with_an_escaped_path(sample_data, tmp_path, ingest):
    data = tmp_path / "data"
    hea = copy_record(sample_data, PTBXL_LR, data, "ok")
    bad = os.fsencode(data) + b"/caf\xe9.hea"
    with open(bad, "wb") as f:
        f.write(hea.read_bytes())
    out = tmp_path / "r.parquet"
    res = ingest(data, "-o", out)
    assert res.returncode == 0, res.stderr
    assert [r["record_id"] for r in records_of(out)] == ["ok"]
    (rej,) = rejects_of(out)
    assert rej["reason"] == "bad_file_name" and rej["source_path"].endswith("/caf\\xe9.hea"), rej
    assert rej["record_id"] == "caf\\xe9" and "not valid UTF-8" in rej["detail"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_fifo_named_like_a_record_is_not_opened(sample_data, tmp_path):
    data = tmp_path / "data"
    copy_record(sample_data, PTBXL_LR, data, "ok")
    os.mkfifo(data / "x.hea")
    os.mkfifo(data / "y.csv")
    os.mkfifo(data / "notes")
    (data / "orphan.dat").write_bytes(b"\0" * 8)  # makes discovery read every header of the folder
    os.symlink(data / "gone.hea", data / "dangling.hea")
    out = tmp_path / "r.parquet"
    res = ingest_process(data, "-o", out, timeout=60)  # used to block forever opening x.hea
    assert res.returncode == 0, res.stderr
    assert [r["record_id"] for r in records_of(out)] == ["ok"]
    rows = {Path(r["source_path"]).name: (r["reason"], r["detail"]) for r in rejects_of(out)}
    assert rows["x.hea"] == ("not_regular_file", "x.hea: a named pipe (FIFO), not a regular file; not opened")
    assert rows["y.csv"][0] == "not_regular_file"
    assert rows["dangling.hea"][0] == "not_regular_file" and "broken symbolic link" in rows["dangling.hea"][1]
    assert rows["notes"][0] == "ignored"  # never opened either
    assert rows["orphan.dat"][0] == "not_ecg"
    # named on the command line, too
    res = ingest_process(data / "x.hea", "-o", tmp_path / "f.parquet", timeout=60)
    assert res.returncode == 2 and "not_regular_file" in res.stderr


# ----------------------------------------------------------------------------------------- #16.6 --max-samples

def test_max_samples_reaches_the_readers(sample_data, tmp_path, ingest):
    assert ReadOptions().max_samples == DEFAULT_MAX_SAMPLES == 2**24
    data = sample_data / "ptbxl" / "records500"  # 5000 samples per lead
    res = ingest(data, "-o", tmp_path / "a.parquet", "--max-samples", "4999")
    assert res.returncode == 2 and "too_large" in res.stderr and "--max-samples 4,999" in res.stderr
    for unbounded in ("0", "none", "5000"):
        res = ingest(data, "-o", tmp_path / f"b{unbounded}.parquet", "--max-samples", unbounded)
        assert res.returncode == 0 and "3 records" in res.stderr, res.stderr
    res = ingest(data, "-o", tmp_path / "c.parquet", "--max-samples", "lots")
    assert res.returncode == 2 and "--max-samples 'lots'" in res.stderr


def test_memory_error_in_a_reader_is_a_too_large_reject(sample_data, tmp_path, monkeypatch):
    """A reader running out of memory loses that record only: the run goes on and keeps the others."""
    import ecgfm_cli.io.readers_wfdb as rw

    real = rw.read_wfdb

    def greedy(hea, *args, **kwargs):
        if hea.name.startswith("01612"):
            raise MemoryError
        return real(hea, *args, **kwargs)

    monkeypatch.setattr(rw, "read_wfdb", greedy)
    out = tmp_path / "r.parquet"
    res = invoke("ingest", sample_data / "ptbxl" / "records500", "-o", out)
    assert res.exit_code == 0, res.output
    assert sorted(r["record_id"] for r in records_of(out)) == ["00000/00841_hr", "02000/02132_hr"]
    (rej,) = rejects_of(out)
    assert rej["reason"] == "too_large" and rej["record_id"] == "01000/01612_hr"


# ----------------------------------------------------------------------------------------- #16.13 PTB-XL copies

def test_ptbxl_copies_at_two_rates_share_a_patient(sample_data, tmp_path):
    out = tmp_path / "r.parquet"
    res = invoke("ingest", sample_data / "ptbxl", "-o", out)
    assert res.exit_code == 0, res.output
    assert "3 recordings are here at 2 rates (100 Hz, 500 Hz" in res.output
    rows = {r["record_id"]: r for r in records_of(out)}
    for ecg in ("00000/00841", "01000/01612", "02000/02132"):
        lr, hr = rows[f"records100/{ecg}_lr"], rows[f"records500/{ecg}_hr"]
        assert lr["patient_id"] == hr["patient_id"] == f"recording:{ecg}" and lr["study_id"] == hr["study_id"] == ecg
    labels = pq.read_table(tmp_path / "r.labels.parquet").to_pylist()
    assert len({r["patient_id"] for r in labels}) == 3
    # the two folders as two PATHs are found to be copies as well
    res = invoke("ingest", sample_data / "ptbxl" / "records100", sample_data / "ptbxl" / "records500",
                 "-o", tmp_path / "two.parquet")
    assert "3 recordings are here at 2 rates" in res.output
    assert len({r["patient_id"] for r in records_of(tmp_path / "two.parquet")}) == 3
    # one rate alone: nothing to say
    res = invoke("ingest", sample_data / "ptbxl" / "records500", "-o", tmp_path / "one.parquet")
    assert "at 2 rates" not in res.output and {r["patient_id"] for r in records_of(tmp_path / "one.parquet")} == {None}


def test_ptbxl_database_gives_patient_ids(sample_data, tmp_path):
    root = tmp_path / "ptbxl"
    shutil.copytree(sample_data / "ptbxl", root)
    (root / "ptbxl_database.csv").write_text(
        "ecg_id,patient_id,age,filename_lr,filename_hr\n"
        "841,15709.0,56,records100/00000/00841_lr,records500/00000/00841_hr\n"
        "1612,15709.0,57,records100/01000/01612_lr,records500/01000/01612_hr\n"
        "2132,20372.0,19,records100/02000/02132_lr,records500/02000/02132_hr\n")
    out = tmp_path / "r.parquet"
    res = invoke("ingest", root / "records500", "-o", out)  # the table is one folder up
    assert res.exit_code == 0, res.output
    assert "patient_id and study_id (ecg_id) of 3 records taken from it (2 patients)" in res.output
    rows = {r["record_id"]: (r["patient_id"], r["study_id"]) for r in records_of(out)}
    assert rows == {"00000/00841_hr": ("15709", "841"), "01000/01612_hr": ("15709", "1612"),
                    "02000/02132_hr": ("20372", "2132")}
    res = invoke("ingest", root, "-o", tmp_path / "all.parquet")
    assert "skipped" not in res.output  # the table is used, not rejected as a signal table that is not one
    rows = records_of(tmp_path / "all.parquet")
    assert {r["patient_id"] for r in rows} == {"15709", "20372"} and len(rows) == 6


# ----------------------------------------------------------------------------------------- #16.15 label keys

def test_labels_keyed_by_file_stem_match_the_ingested_record_ids(sample_data, tmp_path):
    records = tmp_path / "data" / "records"
    for ecg in ("00000/00841_hr", "01000/01612_hr"):
        copy_record(sample_data, Path("records500") / ecg, records, ecg.split("/")[1].split("_")[0])
    labels = tmp_path / "labels.csv"
    labels.write_text("record_id,afib\n00841,1\n01612.hea,0\nnope,1\n")
    out = tmp_path / "r.parquet"
    res = invoke("ingest", tmp_path / "data", "-o", out, "--labels", labels)
    assert res.exit_code == 0, res.output
    assert "2 of 3 rows matched on the file name alone (e.g. '00841' -> 'records/00841')" in res.output
    got = {r["record_id"]: r["afib"] for r in pq.read_table(tmp_path / "r.labels.parquet").to_pylist()}
    assert got == {"records/00841": 1, "records/01612": 0}
    assert "1 of 3 rows name record_id values that were not ingested" in res.output
    # nothing matches at all: an ingested id is shown beside one of the table's
    labels.write_text("record_id,afib\nX1,1\nX2,0\n")
    res = invoke("ingest", tmp_path / "data", "-o", tmp_path / "n.parquet", "--labels", labels)
    assert "e.g. the table's 'X1', while an ingested record is 'records/00841'" in res.output, res.output


def test_ambiguous_stems_are_not_matched(sample_data, tmp_path):
    for site in ("a", "b"):
        copy_record(sample_data, PTBXL_LR, tmp_path / "data" / site, "rec")
    labels = tmp_path / "labels.csv"
    labels.write_text("record_id,afib\nrec,1\n")
    res = invoke("ingest", tmp_path / "data", "-o", tmp_path / "r.parquet", "--labels", labels)
    assert res.exit_code == 0 and "matched on the file name" not in res.output
    assert {r["afib"] for r in pq.read_table(tmp_path / "r.labels.parquet").to_pylist()} == {None}


# ----------------------------------------------------------------------------------------- folders

def test_symlinked_folders_are_followed_once(sample_data, tmp_path, ingest):
    outside = tmp_path / "elsewhere"
    copy_record(sample_data, PTBXL_LR, outside, "far")
    data = tmp_path / "data"
    copy_record(sample_data, PTBXL_LR, data / "real", "near")
    os.symlink(outside, data / "linked")  # a dataset linked in: read (os.walk skipped it silently)
    os.symlink(data / "real", data / "again")  # a link into the tree itself: read once, at its own path
    os.symlink(data, data / "real" / "loop")  # a loop
    srcs = list(discover([data], everything=True))
    got = sorted((s.path.relative_to(data).as_posix(), s.kind) for s in srcs)
    assert got == [("again", "ignored"), ("linked/far.hea", "wfdb"), ("real/loop", "ignored"),
                   ("real/near.hea", "wfdb")], got
    out = tmp_path / "r.parquet"
    res = ingest(data, "-o", out)
    assert res.returncode == 0, res.stderr
    assert sorted(r["record_id"] for r in records_of(out)) == ["linked/far", "real/near"]
    assert "2 other files ignored (again, loop)" in res.stderr


def test_a_folder_that_cannot_be_listed_is_listed_as_such(sample_data, tmp_path, monkeypatch, ingest):
    """os.walk skipped an unreadable folder without a word (permissions are not checked as root: simulated)."""
    copy_record(sample_data, PTBXL_LR, tmp_path / "data" / "open", "a")
    copy_record(sample_data, PTBXL_LR, tmp_path / "data" / "locked", "b")
    real = os.scandir

    def scandir(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "r.parquet"
    res = ingest(tmp_path / "data", "-o", out)
    assert res.returncode == 0, res.stderr
    assert [r["record_id"] for r in records_of(out)] == ["open/a"]
    (rej,) = rejects_of(out)
    assert rej["reason"] == "ignored" and rej["detail"].endswith("locked: a folder that cannot be listed "
                                                                 "(Permission denied)"), rej
    assert "1 other file ignored (locked)" in res.stderr
