"""Malformed inputs, one per row: each is written beside a good record in tmp_path and ingested in one run; the bad
one must land in the rejects table with its reason code (or, for a reason of None, be kept), and the good record
must come out unchanged. Add a case by adding a row to CASES (a function that writes files into a folder).
"""

from __future__ import annotations

import gzip
import os
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import wfdb

from ecgfm_cli.contract import STANDARD_LEADS
from ecgfm_cli.ingest import IngestOptions, run_ingest
from ecgfm_cli.io.artifacts import Output
from ecgfm_cli.io.readers import ReadOptions
from ecgfm_cli.io.readers_wfdb import read_wfdb
from ecgfm_cli.io.record import REASONS, RejectedRecord

N, FS = 1000, 500  # samples per lead, Hz of the synthetic records


def _digital(n_sig: int = 12, n: int = N, seed: int = 0) -> np.ndarray:
    """(n, n_sig) int16 ADC values of a plausible ECG at gain 1000/mV: a 1.2 mV spike per second on noise."""
    rng = np.random.default_rng(seed)
    d = rng.integers(-60, 60, size=(n, n_sig))
    d[:: FS, :] += 1200
    return d.astype(np.int16)


def _write_wfdb(folder: Path, name: str, n_sig: int = 12, n: int = N, seed: int = 0, gain: float = 1000.0) -> Path:
    wfdb.wrsamp(name, fs=FS, units=["mV"] * n_sig, sig_name=list(STANDARD_LEADS[:n_sig]),
                d_signal=_digital(n_sig, n, seed), fmt=["16"] * n_sig, adc_gain=[gain] * n_sig,
                baseline=[0] * n_sig, write_dir=str(folder))
    return folder / f"{name}.hea"


def _header(folder: Path, name: str, record_line: str, sig_lines: list[str]) -> None:
    (folder / f"{name}.hea").write_text("\n".join([record_line, *sig_lines]) + "\n", encoding="utf-8")


def _sig_lines(file_name: str, n_sig: int = 12, fmt: str = "16", gain: str = "1000") -> list[str]:
    return [f"{file_name} {fmt} {gain}/mV 16 0 0 0 0 {lead}" for lead in STANDARD_LEADS[:n_sig]]


def _bad_dat(folder: Path, n_sig: int = 12, n: int = N) -> None:
    (folder / "bad.dat").write_bytes(_digital(n_sig, n, seed=1).tobytes())


# ------------------------------------------------------------------------------------------------ the cases

def signal_lines_more_than_declared(d: Path) -> None:
    _bad_dat(d)
    _header(d, "bad", f"bad 11 {FS} {N}", _sig_lines("bad.dat"))  # 11 declared, 12 lines: the leads would shift


def signal_lines_fewer_than_declared(d: Path) -> None:
    _bad_dat(d)
    _header(d, "bad", f"bad 12 {FS} {N}", _sig_lines("bad.dat", 11))


def format16_labelled_8(d: Path) -> None:
    _bad_dat(d)
    _header(d, "bad", f"bad 12 {FS} {N}", _sig_lines("bad.dat", fmt="8"))


def format16_labelled_212(d: Path) -> None:
    _bad_dat(d)
    _header(d, "bad", f"bad 12 {FS} {N}", _sig_lines("bad.dat", fmt="212"))


def file_longer_than_declared(d: Path) -> None:
    _bad_dat(d, n=N + 7)
    _header(d, "bad", f"bad 12 {FS} {N}", _sig_lines("bad.dat"))


def huge_declared_length(d: Path) -> None:
    _bad_dat(d)
    _header(d, "bad", f"bad 12 {FS} 200000000", _sig_lines("bad.dat"))  # 12 x 2e8 samples: 19 GB as float64


def path_traversal(d: Path) -> None:
    _header(d, "bad", f"bad 1 {FS} 100", _sig_lines("../../../../../../../../etc/passwd", 1))


def absolute_path_to_another_record(d: Path) -> None:
    _header(d, "bad", f"bad 12 {FS} {N}", _sig_lines(str(d / "good.dat")))


def dot_dot_into_a_sibling_folder(d: Path) -> None:
    (d.parent / "elsewhere").mkdir(exist_ok=True)
    (d.parent / "elsewhere" / "x.dat").write_bytes(_digital().tobytes())
    _header(d, "bad", f"bad 12 {FS} {N}", _sig_lines("../elsewhere/x.dat"))


def negative_rate(d: Path) -> None:
    _bad_dat(d)
    _header(d, "bad", f"bad 12 -500 {N}", _sig_lines("bad.dat"))


def nan_rate(d: Path) -> None:
    _bad_dat(d)
    _header(d, "bad", f"bad 12 nan {N}", _sig_lines("bad.dat"))


def inf_rate(d: Path) -> None:
    _bad_dat(d)
    _header(d, "bad", f"bad 12 inf {N}", _sig_lines("bad.dat"))


def format_999(d: Path) -> None:
    _bad_dat(d)
    _header(d, "bad", f"bad 12 {FS} {N}", _sig_lines("bad.dat", fmt="999"))


def signal_file_is_a_directory(d: Path) -> None:
    (d / "bad.dat").mkdir()
    _header(d, "bad", f"bad 12 {FS} {N}", _sig_lines("bad.dat"))


def signal_file_is_a_symlink_loop(d: Path) -> None:
    os.symlink("bad.dat", d / "bad.dat")
    _header(d, "bad", f"bad 12 {FS} {N}", _sig_lines("bad.dat"))


def signal_file_is_a_fifo(d: Path) -> None:
    os.mkfifo(d / "bad.dat")
    _header(d, "bad", f"bad 12 {FS} {N}", _sig_lines("bad.dat"))


def utf8_record_name(d: Path) -> None:  # a valid record: read, not rejected
    name = "bad_Ø_é"
    (d / f"{name}.dat").write_bytes(_digital(seed=1).tobytes())
    _header(d, name, f"{name} 12 {FS} {N}", _sig_lines(f"{name}.dat"))


def gain_1000x_off(d: Path) -> None:  # ADC units labelled as mV (seen in MIMIC): every lead swings ~60 mV
    _bad_dat(d)
    _header(d, "bad", f"bad 12 {FS} {N}", _sig_lines("bad.dat", gain="1"))


def gain_5x_off(d: Path) -> None:  # a real-world mistake no amplitude can prove: kept
    _bad_dat(d)
    _header(d, "bad", f"bad 12 {FS} {N}", _sig_lines("bad.dat", gain="200"))


def multi_segment_of_empty_segments(d: Path) -> None:
    _header(d, "bad", f"bad/2 12 {FS} {2 * N}", ["~ 1000", "~ 1000"])


def segment_header_outside(d: Path) -> None:
    _header(d, "bad", f"bad/1 12 {FS} {N}", ["../../good 1000"])


def segment_signal_file_outside(d: Path) -> None:
    _header(d, "bad", f"bad/1 12 {FS} {N}", ["bad_1 1000"])
    _header(d, "bad_1", f"bad_1 12 {FS} {N}", _sig_lines("/etc/passwd"))


def segment_longer_than_declared(d: Path) -> None:
    _header(d, "bad", f"bad/1 12 {FS} {N}", ["bad_1 1000"])
    _header(d, "bad_1", f"bad_1 12 {FS} {N}", _sig_lines("bad.dat", fmt="8"))
    _bad_dat(d)


def csv_longer_than_max_samples(d: Path) -> None:
    rows = "\n".join(",".join(["0.1"] * 12) for _ in range(3000))
    (d / "bad.csv").write_text(",".join(STANDARD_LEADS) + "\n" + rows + "\n")


def gzip_csv_bomb(d: Path) -> None:  # 2.4 MB of text in a few kB of gzip; read in chunks and stopped early
    with gzip.open(d / "bad.csv.gz", "wb") as f:
        f.write(b"0,0,0,0,0,0,0,0,0,0,0,0\n" * 100_000)


def hdf5_longer_than_max_samples(d: Path) -> None:
    import h5py

    with h5py.File(d / "bad.h5", "w") as f:
        f["ecg"] = np.zeros((12, 3000), np.float32)


@dataclass(frozen=True)
class Case:
    write: Callable[[Path], None]
    reason: str | None  # None: the file is read (kept)
    max_samples: int | None = 1 << 24


CASES = [
    Case(signal_lines_more_than_declared, "unreadable"),
    Case(signal_lines_fewer_than_declared, "unreadable"),
    Case(format16_labelled_8, "size_mismatch"),
    Case(format16_labelled_212, "size_mismatch"),
    Case(file_longer_than_declared, "size_mismatch"),
    Case(huge_declared_length, "too_large"),
    Case(path_traversal, "bad_path"),
    Case(absolute_path_to_another_record, "bad_path"),
    Case(dot_dot_into_a_sibling_folder, "bad_path"),
    Case(negative_rate, "bad_sample_rate"),
    Case(nan_rate, "bad_sample_rate"),
    Case(inf_rate, "bad_sample_rate"),
    Case(format_999, "bad_format"),
    Case(signal_file_is_a_directory, "missing_data"),
    Case(signal_file_is_a_symlink_loop, "unreadable"),
    Case(signal_file_is_a_fifo, "not_regular_file"),
    Case(utf8_record_name, None),
    Case(gain_1000x_off, "implausible_amplitude"),
    Case(gain_5x_off, None),
    Case(multi_segment_of_empty_segments, "empty"),
    Case(segment_header_outside, "bad_path"),
    Case(segment_signal_file_outside, "bad_path"),
    Case(segment_longer_than_declared, "size_mismatch"),
    Case(csv_longer_than_max_samples, "too_large", max_samples=2000),
    Case(gzip_csv_bomb, "too_large", max_samples=2000),
    Case(hdf5_longer_than_max_samples, "too_large", max_samples=2000),
]


def _ingest(folder: Path, out: Path, max_samples: int | None) -> tuple[dict[str, dict], list[dict]]:
    opts = IngestOptions(read=ReadOptions(fs=FS, max_samples=max_samples), rejects_path=out / "rejects.parquet")
    run_ingest([folder], Output("parquet", out / "records.parquet"), opts)
    records = {r["record_id"]: r for r in pq.read_table(out / "records.parquet").to_pylist()}
    return records, pq.read_table(out / "rejects.parquet").to_pylist()


@pytest.mark.parametrize("case", CASES, ids=[c.write.__name__ for c in CASES])
def test_bad_input_is_rejected_and_the_good_record_kept(tmp_path, case):
    folder = tmp_path / "data" / "records"
    folder.mkdir(parents=True)
    good = read_wfdb(_write_wfdb(folder, "good"), "good")
    case.write(folder)
    records, rejects = _ingest(folder, tmp_path / "out", case.max_samples)
    np.testing.assert_array_equal(np.asarray(records["good"]["signal"], np.float32).reshape(12, N), good.signal)
    assert records["good"]["leads"] == list(STANDARD_LEADS)
    if case.reason is None:
        assert not rejects, rejects
        assert len(records) == 2
        return
    assert set(records) == {"good"}
    assert len(rejects) == 1, rejects
    (row,) = rejects
    assert row["reason"] == case.reason, row
    assert row["reason"] in REASONS and row["detail"] and "Error" not in row["detail"], row


def test_huge_declared_length_allocates_nothing(tmp_path):
    huge_declared_length(tmp_path)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(RejectedRecord) as e:
        read_wfdb(tmp_path / "bad.hea", "bad", max_samples=1 << 24)
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert e.value.reason == "too_large" and "200,000,000" in e.value.detail and "--max-samples" in e.value.detail
    assert elapsed < 1.0 and peak < 10 << 20


def test_fifo_header_is_never_opened(tmp_path):
    os.mkfifo(tmp_path / "x.hea")
    with pytest.raises(RejectedRecord) as e:
        read_wfdb(tmp_path / "x.hea", "x")  # opening a FIFO for reading would block until a writer comes
    assert e.value.reason == "not_regular_file"


def test_gzip_bomb_stops_early(tmp_path):
    from ecgfm_cli.io.readers_csv import read_csv

    with gzip.open(tmp_path / "bomb.csv.gz", "wb") as f:
        for _ in range(40):
            f.write(b"0,0,0,0,0,0,0,0,0,0,0,0\n" * 100_000)  # 96 MB of text
    tracemalloc.start()
    with pytest.raises(RejectedRecord) as e:
        read_csv(tmp_path / "bomb.csv.gz", "bomb", FS, None, None, max_samples=1000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert e.value.reason == "too_large"
    assert peak < 64 << 20  # one parse block, not the decompressed file


def test_infinite_samples_are_flagged_per_lead(tmp_path):
    """A tiny gain on one lead (its values overflow float32) and one 'inf' in a table are kept and flagged."""
    folder = tmp_path / "in"
    folder.mkdir()
    lines = _sig_lines("rec.dat")
    lines[2] = lines[2].replace(" 1000/mV ", " 1e-40/mV ")
    (folder / "rec.dat").write_bytes(_digital().tobytes())
    _header(folder, "rec", f"rec 12 {FS} {N}", lines)
    rows = [",".join(["0.1"] * 12) for _ in range(500)]
    rows[10] = ",".join(["0.1"] * 4 + ["inf"] + ["0.1"] * 7)
    (folder / "tab.csv").write_text(",".join(STANDARD_LEADS) + "\n" + "\n".join(rows) + "\n")
    records, rejects = _ingest(folder, tmp_path / "out", 1 << 24)
    assert not rejects, rejects
    assert records["rec"]["lead_nan"] == [i == 2 for i in range(12)]
    assert records["tab"]["lead_nan"] == [i == 4 for i in range(12)]
