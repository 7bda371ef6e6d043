"""Raw-file readers: every format on sample_data and synthetic files, against wfdb-python where it can read."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import wfdb

from ecgfm_cli.contract import STANDARD_LEADS
from ecgfm_cli.io.readers import ReadOptions, Source, discover, read_path, read_source
from ecgfm_cli.io.readers_wfdb import read_wfdb
from ecgfm_cli.io.record import REASONS, RawRecord, RejectedRecord
from ecgfm_cli.io.wfdb_header import parse_comments, parse_header


def _one(path: Path, opts: ReadOptions | None = None, root: Path | None = None) -> RawRecord | RejectedRecord:
    recs = list(read_source(Source(path, root or path.parent, _kind(path)), opts or ReadOptions()))
    assert len(recs) == 1
    return recs[0]


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".hea"):
        return "wfdb"
    if name.endswith(".mat"):
        return "mat"
    if name.endswith((".h5", ".hdf5", ".hdf")):
        return "hdf5"
    if name.endswith((".csv", ".txt", ".csv.gz", ".txt.gz")):
        return "csv"
    return "unsupported"


def _ok(r) -> RawRecord:
    assert isinstance(r, RawRecord), f"rejected: {r.reason}: {r.detail}"
    return r


def _rejected(r, reason: str) -> RejectedRecord:
    assert isinstance(r, RejectedRecord), f"expected {reason}, got a record"
    assert r.reason == reason, f"{r.reason}: {r.detail}"
    assert r.reason in REASONS and r.detail and r.path
    return r


def _expected(hea: Path) -> np.ndarray:
    return wfdb.rdsamp(str(hea.with_suffix("")))[0].T.astype(np.float32)


# --------------------------------------------------------------------------------------- WFDB

def test_sample_wfdb_records_equal_wfdb(sample_data):
    heas = sorted(sample_data.rglob("*.hea"))
    assert len(heas) > 30
    for hea in heas:
        r = _ok(_one(hea, ReadOptions(store_digital=True)))
        if hea.stem == "E00015":
            continue  # wfdb-python rejects this header; see test_georgia_2020_header
        expected = _expected(hea)
        assert r.signal.dtype == np.float32 and r.signal.flags.c_contiguous
        np.testing.assert_array_equal(r.signal, expected, err_msg=str(hea))
        d = wfdb.rdrecord(str(hea.with_suffix("")), physical=False).d_signal.T
        np.testing.assert_array_equal(r.digital, d)
        assert r.leads == wfdb.rdheader(str(hea.with_suffix(""))).sig_name


def test_georgia_2020_header(sample_data):
    hea = sample_data / "challenge2021" / "E00015.hea"
    r = _ok(_one(hea))
    val = scipy.io.loadmat(str(hea.with_suffix(".mat")))["val"]
    np.testing.assert_array_equal(r.signal, (val / 4880.0).astype(np.float32))
    assert r.source_format == "wfdb-mat" and r.sample_rate == 500 and r.n_samples == 5000
    assert r.base_datetime == "05-May-2020 14:50:55"
    assert r.age == 67 and r.sex == "M" and r.dx_codes == ["251146004", "284470004"]
    assert r.record_id == "E00015"


def test_header_metadata(sample_data):
    r = _ok(_one(sample_data / "code15_wfdb" / "1111.hea"))
    assert r.leads[3] == "AVR" and r.sample_rate == 400
    h = parse_header((sample_data / "code15_wfdb" / "1111.hea").read_text())
    meta = parse_comments(h.comments)
    assert r.patient_id == meta.patient_id and r.study_id == meta.study_id is not None
    m = parse_comments(["Age: 63", "Sex: Female", "Chagas label: True", "Dx: 1,2, 2", "Labels: NORM, STTC",
                        "Patient ID: 77", "Height: 150", "paroxysmal atrial fibrillation", "Age2: x"])
    assert m.age == 63.0 and m.sex == "F" and m.patient_id == "77"
    assert m.dx_codes == ["chagas", "1", "2", "NORM", "STTC"]
    assert m.comments == {"Chagas label": "True", "Height": "150", "Age2": "x",
                          "notes": "paroxysmal atrial fibrillation"}
    assert parse_comments(["Age: NaN", "Sex: Unknown"]).age is None


def test_ptbxl_ids_keep_resolution(sample_data):
    recs = [r for r in read_path(sample_data / "ptbxl") if isinstance(r, RawRecord)]
    ids = [r.record_id for r in recs]
    assert "records100/00000/00841_lr" in ids and "records500/00000/00841_hr" in ids
    assert len(set(ids)) == len(ids) == 6
    r = next(r for r in recs if r.record_id == "records500/00000/00841_hr")
    assert r.dx_codes == ["STTC", "HYP", "PVC"] and r.age == 73 and r.sex == "F"


def _copy_record(src_hea: Path, dst_dir: Path, name: str | None = None) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    name = name or src_hea.stem
    for f in src_hea.parent.glob(src_hea.stem + ".*"):
        shutil.copy(f, dst_dir / (name + f.suffix))
    return dst_dir / (name + ".hea")


def test_mimic_layout_ids(sample_data, tmp_path):
    d = tmp_path / "files" / "p1000" / "p10001234" / "s40689238"
    hea = _copy_record(sample_data / "ptbxl" / "records500" / "00000" / "00841_hr.hea", d, "40689238")
    text = hea.read_text().replace("00841_hr", "40689238")
    hea.write_text(text)
    r = _ok(next(read_source(next(discover([tmp_path])), ReadOptions())))
    assert r.record_id == "files/p1000/p10001234/s40689238/40689238"
    assert r.patient_id == "10001234" and r.study_id == "40689238"


def test_crlf_iso_date_comments_first(sample_data, tmp_path):
    src = sample_data / "ptbxl" / "records500" / "00000" / "00841_hr.hea"
    hea = _copy_record(src, tmp_path)
    lines = src.read_text().splitlines()
    toks = lines[0].split()
    lines[0] = " ".join(toks[:4]) + " 2020-05-12T12:33:59"
    hea.write_bytes(("# leading comment\r\n\r\n" + "\r\n".join(lines) + "\r\n").encode())
    r = _ok(_one(hea))
    np.testing.assert_array_equal(r.signal, _expected(src))
    assert r.base_datetime == "2020-05-12T12:33:59"
    assert r.comments["notes"] == "leading comment"


def _write_header(path: Path, rec_line: str, sig_lines: list[str], comments: list[str] = ()) -> Path:
    path.write_text("\n".join([rec_line, *sig_lines, *(f"# {c}" for c in comments)]) + "\n")
    return path


def _encode(d: np.ndarray, fmt: str) -> bytes:
    """Frames (n, n_sig) of digital values -> bytes of a WFDB format wfdb-python cannot write."""
    flat = d.reshape(-1)
    if fmt == "8":
        diffs = np.diff(d, axis=0, prepend=d[:1]).reshape(-1)
        return diffs.astype(np.int8).tobytes()
    if fmt == "61":
        return flat.astype(">i2").tobytes()
    if fmt == "160":
        return (flat + 32768).astype("<u2").tobytes()
    if fmt == "212":
        u = (flat & 0xFFF).astype(np.uint16)
        if u.size % 2:
            u = np.append(u, 0)
        out = np.zeros(3 * (u.size // 2), np.uint8)
        out[0::3] = u[0::2] & 0xFF
        out[1::3] = ((u[0::2] >> 8) & 0x0F) | (((u[1::2] >> 8) & 0x0F) << 4)
        out[2::3] = u[1::2] & 0xFF
        return out[: (3 * flat.size + 1) // 2].tobytes()
    u = (flat & 0x3FF).astype(np.uint16).reshape(-1, 3)  # 310 / 311: three samples per 32-bit word
    out = np.zeros((u.shape[0], 4), np.uint8)
    s0, s1, s2 = u[:, 0], u[:, 1], u[:, 2]
    if fmt == "310":
        out[:, 0] = (s0 & 0x7F) << 1
        out[:, 1] = ((s0 >> 7) & 7) | ((s2 & 0x1F) << 3)
        out[:, 2] = (s1 & 0x7F) << 1
        out[:, 3] = ((s1 >> 7) & 7) | (((s2 >> 5) & 0x1F) << 3)
    else:
        out[:, 0] = s0 & 0xFF
        out[:, 1] = ((s0 >> 8) & 3) | ((s1 & 0x3F) << 2)
        out[:, 2] = ((s1 >> 6) & 0xF) | ((s2 & 0xF) << 4)
        out[:, 3] = (s2 >> 4) & 0x3F
    return out.tobytes()


@pytest.mark.parametrize("fmt", ["8", "16", "24", "32", "61", "80", "160", "212", "310", "311"])
def test_synthetic_formats_equal_wfdb(tmp_path, fmt):
    rng = np.random.default_rng(int(fmt))
    lo, hi = {"8": (-60, 60), "80": (-127, 127), "310": (-511, 511), "311": (-511, 511), "212": (-2047, 2047),
              "24": (-2**23 + 1, 2**23 - 1), "32": (-2**31 + 1, 2**31 - 1)}.get(fmt, (-32767, 32767))
    n = 1001  # odd: exercises partial blocks of the packed formats
    d = rng.integers(lo, hi, size=(n, 3)).astype(np.int64)
    if fmt == "8":
        d = np.cumsum(rng.integers(-3, 4, size=(n, 3)), axis=0)
    else:
        d[5, 1] = {"80": -128, "310": -512, "311": -512, "212": -2048, "24": -2**23, "32": -2**31}.get(fmt, -32768)
    gains, baselines = [200.0, 1000.5, 37837.142857142855], [0, -12, 130]
    names = ["A", "B", "C"]  # not ECG lead names: full-range random values would fail the amplitude check
    if fmt in ("16", "24", "32", "80"):  # the formats wfdb-python can write
        wfdb.wrsamp("rec", fs=250, units=["mV", "mV", "uV"], sig_name=names, d_signal=d, fmt=[fmt] * 3,
                    adc_gain=gains, baseline=baselines, write_dir=str(tmp_path))
    else:
        init = d[0] if fmt == "8" else [0, 0, 0]
        (tmp_path / "rec.dat").write_bytes(_encode(d, fmt))
        _write_header(tmp_path / "rec.hea", f"rec 3 250 {n}", [
            f"rec.dat {fmt} {g!r}({b})/{u} 12 0 {i} 0 0 {name}"
            for g, b, u, i, name in zip(gains, baselines, ["mV", "mV", "uV"], init, names, strict=True)])
    hea = tmp_path / "rec.hea"
    r = _ok(_one(hea, ReadOptions(store_digital=True)))
    np.testing.assert_array_equal(r.signal, _expected(hea))
    if fmt != "8":
        assert np.isnan(r.signal[1, 5])
    assert r.units == ["mV", "mV", "uV"] and r.baseline == [0, -12, 130]
    forced = read_wfdb(hea, "rec", force_fallback=True)
    np.testing.assert_array_equal(forced.signal, r.signal)


def test_multifile_offset_default_gain_adc_zero(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(-2000, 2000, size=(500, 2)).astype("<i2")
    b = rng.integers(-2000, 2000, size=(500, 1))
    (tmp_path / "m_a.dat").write_bytes(b"\x07" * 10 + a.tobytes())
    flat = (b.reshape(-1) & 0xFFF).astype(np.uint16)
    packed = np.zeros(750, np.uint8)
    packed[0::3] = flat[0::2] & 0xFF
    packed[1::3] = ((flat[0::2] >> 8) & 0x0F) | (((flat[1::2] >> 8) & 0x0F) << 4)
    packed[2::3] = flat[1::2] & 0xFF
    (tmp_path / "m_b.dat").write_bytes(packed.tobytes())
    hea = _write_header(tmp_path / "m.hea", "m 3 360 500", [
        "m_a.dat 16+10 0 12 5 0 0 0 ecg1",       # gain 0 -> 200, baseline = ADC zero 5
        "m_a.dat 16+10 1000(0)/mV 16 0 0 0 0 V5",
        "m_b.dat 212 200(-3)/uV 12 0 0 0 0 II",
    ])
    r = _ok(_one(hea))
    np.testing.assert_array_equal(r.signal, _expected(hea))
    np.testing.assert_array_equal(r.signal[0], ((a[:, 0] - 5) / 200.0).astype(np.float32))
    assert r.leads == ["ecg1", "V5", "II"] and r.units == ["mV", "mV", "uV"]
    # no gain at all: 200/mV default
    hea2 = _write_header(tmp_path / "n.hea", "n 2 360", ["m_a.dat 16+10", "m_a.dat 16+10"])
    r2 = _ok(_one(hea2))
    np.testing.assert_array_equal(r2.signal, _expected(hea2))
    assert r2.n_samples == 500 and r2.sample_rate == 360


def test_multifrequency_falls_back_to_wfdb(tmp_path):
    rng = np.random.default_rng(1)
    d = rng.integers(-100, 100, size=(150, 3)).astype("<i2")  # 150 frames: sig0 x2, sig1 x1
    (tmp_path / "mf.dat").write_bytes(d.tobytes())
    hea = _write_header(tmp_path / "mf.hea", "mf 2 250 150",
                        ["mf.dat 16x2 200 16 0 0 0 0 I", "mf.dat 16 200 16 0 0 0 0 II"])
    r = _ok(_one(hea))
    np.testing.assert_allclose(r.signal, _expected(hea))


def test_multi_segment_record_is_read_once_through_its_master(tmp_path):
    """The segment headers a multi-segment master lists are not records of their own (they were read twice)."""
    rng = np.random.default_rng(2)
    for name in ("rec_0001", "rec_0002"):
        wfdb.wrsamp(name, fs=500, units=["mV", "mV"], sig_name=["I", "II"], p_signal=rng.normal(size=(1500, 2)),
                    fmt=["16", "16"], write_dir=str(tmp_path))
    (tmp_path / "rec.hea").write_text("rec/2 2 500 3000\nrec_0001 1500\nrec_0002 1500\n")
    wfdb.wrsamp("other_1", fs=500, units=["mV"], sig_name=["I"], p_signal=rng.normal(size=(500, 1)), fmt=["16"],
                write_dir=str(tmp_path))  # named like a segment, but no master lists it
    srcs = [s.path.name for s in discover([tmp_path])]
    assert srcs == ["other_1.hea", "rec.hea"]
    rec = _ok(_one(tmp_path / "rec.hea"))
    np.testing.assert_allclose(rec.signal, _expected(tmp_path / "rec.hea"), atol=1e-6)
    assert rec.signal.shape == (2, 3000)


def test_mat_v4_without_offset_in_header(sample_data, tmp_path):
    src = sample_data / "challenge2021" / "A0001.hea"
    hea = _copy_record(src, tmp_path)
    hea.write_text(hea.read_text().replace("16+24", "16"))
    np.testing.assert_array_equal(_ok(_one(hea)).signal, _expected(src))


def test_mat_v5_signal_file(sample_data, tmp_path):
    src = sample_data / "challenge2021" / "A0002.hea"
    hea = _copy_record(src, tmp_path)
    val = scipy.io.loadmat(str(src.with_suffix(".mat")))["val"]
    scipy.io.savemat(str(tmp_path / "A0002.mat"), {"val": val})
    np.testing.assert_array_equal(_ok(_one(hea)).signal, _expected(src))


# --------------------------------------------------------------------------------------- containers

def test_code15_hdf5_strips_zero_padding(tmp_path):
    rng = np.random.default_rng(2)
    tr = np.zeros((3, 4096, 12), np.float32)
    tr[0, 100:3000] = rng.normal(size=(2900, 12))
    tr[0, 1500] = 0.0  # an interior all-zero sample stays
    tr[1, :, 4] = 0.5  # one lead nonzero everywhere: nothing stripped
    path = tmp_path / "exams_part0.hdf5"
    with h5py.File(path, "w") as f:
        f["tracings"] = tr
        f["exam_id"] = np.array([1169160, 42, 7])
        f["patient_id"] = np.array([5, 6, 8])
    recs = list(read_source(Source(path, tmp_path, "hdf5"), ReadOptions()))
    r0, r1 = _ok(recs[0]), _ok(recs[1])
    assert r0.record_id == "exams_part0#1169160" and r0.study_id == "1169160" and r0.patient_id == "5"
    np.testing.assert_array_equal(r0.signal, tr[0, 100:3000].T)
    assert r0.leads == list(STANDARD_LEADS) and r0.sample_rate == 400 and r0.source_format == "code15-hdf5"
    assert r1.n_samples == 4096
    _rejected(recs[2], "empty")
    assert recs[2].record_id == "exams_part0#7"
    # root is the file itself: the stem
    assert next(read_source(Source(path, path, "hdf5"))).record_id == "exams_part0#1169160"


def test_sph_hdf5(sample_data):
    r = _ok(_one(sample_data / "sph" / "SPH00001.h5"))
    with h5py.File(sample_data / "sph" / "SPH00001.h5") as f:
        np.testing.assert_array_equal(r.signal, f["ecg"][()].astype(np.float32))
    assert r.source_format == "sph-hdf5" and r.sample_rate == 500 and r.patient_id is None


def test_fairseq_mat(sample_data):
    path = sample_data / "ecgfm_reference" / "org" / "code_15_1594286.mat"
    r = _ok(_one(path))
    m = scipy.io.loadmat(str(path))
    np.testing.assert_array_equal(r.signal, m["feats"].astype(np.float32))
    assert r.sample_rate == float(m["curr_sample_rate"][0, 0]) and r.source_format == "fairseq-mat"


def test_cpsc_mat(tmp_path):
    data = np.random.default_rng(3).normal(size=(12, 6000))
    ecg = np.array([[(np.array(["Female"]), np.array([[52]]), data)]],
                   dtype=[("sex", "O"), ("age", "O"), ("data", "O")])
    scipy.io.savemat(str(tmp_path / "A1980.mat"), {"ECG": ecg})
    r = _ok(_one(tmp_path / "A1980.mat"))
    np.testing.assert_array_equal(r.signal, data.astype(np.float32))
    assert r.sex == "F" and r.age == 52 and r.sample_rate == 500 and r.source_format == "cpsc-mat"


# --------------------------------------------------------------------------------------- CSV

def test_cinc2011_csv(sample_data):
    path = sample_data / "cinc2011" / "1002603.txt.gz"
    r = _ok(_one(path, ReadOptions(fs=500)))
    ref = np.loadtxt(path, delimiter=",")
    assert r.signal.shape == (12, 5000) and r.leads == list(STANDARD_LEADS) and r.units == [""] * 12
    np.testing.assert_array_equal(r.signal, ref[:, 1:].T.astype(np.float32))
    assert r.record_id == "1002603"
    g = _ok(_one(path, ReadOptions(fs=500, gain=200, store_digital=True)))
    np.testing.assert_array_equal(g.signal, (ref[:, 1:].T / 200).astype(np.float32))
    assert g.units == ["mV"] * 12 and g.digital.dtype == np.int32 and g.gain == [200.0] * 12
    _rejected(_one(path), "bad_sample_rate")
    assert "--fs" in _one(path).detail


def test_csv_header_counter_and_leads(tmp_path):
    x = np.random.default_rng(4).normal(size=(300, 2))
    p = tmp_path / "h.csv"
    p.write_text("sample,II,V5\n" + "\n".join(f"{i + 1},{a},{b}" for i, (a, b) in enumerate(x)))
    r = _ok(_one(p, ReadOptions(fs=250)))
    assert r.leads == ["II", "V5"] and r.n_samples == 300
    np.testing.assert_array_equal(r.signal, x.T.astype(np.float32))
    q = tmp_path / "t.txt"
    q.write_text("\n".join(f"{a} {b}" for a, b in x))
    r = _ok(_one(q, ReadOptions(fs=250, leads=["I", "II"])))
    np.testing.assert_array_equal(r.signal, x.T.astype(np.float32))
    _rejected(_one(q, ReadOptions(fs=250)), "not_ecg")  # 2 columns, 12 default names
    t = tmp_path / "time.csv"
    t.write_text("time,I\n" + "\n".join(f"{i / 500},{v}" for i, v in enumerate(x[:, 0])))
    assert _ok(_one(t)).sample_rate == pytest.approx(500)


# --------------------------------------------------------------------------------------- discovery

def test_discover_pairs_and_skips(sample_data, tmp_path):
    shutil.copytree(sample_data / "cpsc2021", tmp_path / "cpsc2021")
    _copy_record(sample_data / "challenge2021" / "A0001.hea", tmp_path / "ch")
    for name in ("notes.md", "x.json", "img.png", "rec.atr", "s.xyz"):
        (tmp_path / name).write_text("x")
    (tmp_path / "scan.edf").write_bytes(b"0       ")
    srcs = list(discover([tmp_path]))
    assert [(s.path.relative_to(tmp_path).as_posix(), s.kind) for s in srcs] == [
        ("scan.edf", "sniff"), ("ch/A0001.hea", "wfdb"), ("cpsc2021/data_8_4.hea", "wfdb")]
    assert srcs == list(discover([tmp_path]))
    recs = [r for s in srcs for r in read_source(s, ReadOptions())]
    _rejected(recs[0], "not_ecg")
    assert [r.record_id for r in recs[1:]] == ["ch/A0001", "cpsc2021/data_8_4"]
    one = list(discover([tmp_path / "ch" / "A0001.mat"]))  # an explicitly named .mat reads via its header
    assert _ok(next(read_source(one[0]))).source_format == "wfdb-mat"


def test_orphan_dat_is_reported_even_when_a_header_names_a_longer_file(tmp_path):
    """``00.dat`` is not ``100.dat``: a signal file is matched by name on the headers' signal lines."""
    _write_header(tmp_path / "100.hea", "100 1 500 10", ["100.dat 16 200 16 0 0 0 0 I"])
    (tmp_path / "100.dat").write_bytes(b"\0" * 20)
    _write_header(tmp_path / "multi.hea", "multi 1 500 10", ["part_a.dat 16 200 16 0 0 0 0 I"])
    (tmp_path / "part_a.dat").write_bytes(b"\0" * 20)
    (tmp_path / "00.dat").write_bytes(b"\0" * 20)
    assert [(s.path.name, s.kind) for s in discover([tmp_path])] == [
        ("00.dat", "unsupported"), ("100.hea", "wfdb"), ("multi.hea", "wfdb")]


# --------------------------------------------------------------------------------------- rejects

def test_reject_reasons(sample_data, tmp_path):
    src = sample_data / "ptbxl" / "records100" / "00000" / "00841_lr.hea"
    text = src.read_text()
    rec_line = text.splitlines()[0]

    def variant(name: str, new_text: str, copy_dat: bool = True) -> Path:
        d = tmp_path / name
        d.mkdir()
        if copy_dat:
            shutil.copy(src.with_suffix(".dat"), d / "00841_lr.dat")
        (d / "00841_lr.hea").write_text(new_text)
        return d / "00841_lr.hea"

    _rejected(_one(variant("garbage", "this is not a header\n")), "unreadable")
    r = _rejected(_one(variant("missing", text, copy_dat=False)), "missing_data")
    assert "00841_lr.dat" in r.detail
    r = _rejected(_one(variant("short", text.replace(rec_line, rec_line.replace(" 1000 ", " 2000 ")))),
                  "size_mismatch")
    assert "1000 of the 2000" in r.detail
    r = _rejected(_one(variant("fs0", text.replace(" 100 1000 ", " 0 1000 "))), "bad_sample_rate")
    assert r.detail.startswith("00841_lr.hea line 1: sample rate 0")
    _rejected(_one(variant("fs_huge", text.replace(" 100 1000 ", " 50000 1000 "))), "bad_sample_rate")
    _rejected(_one(variant("dup", text.replace(" 0 III\n", " 0 LEAD I\n"))), "duplicate_lead")
    _rejected(_one(variant("empty", text.replace(" 100 1000 ", " 100 0 "))), "empty")
    # unknown lead names are not a reader error
    _ok(_one(variant("unknown", text.replace(" 0 III\n", " 0 ECG\n"))))

    bad_mat = tmp_path / "k.mat"
    scipy.io.savemat(str(bad_mat), {"foo": np.zeros((2, 2))})
    _rejected(_one(bad_mat), "not_ecg")
    (tmp_path / "corrupt.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\x00" * 20)
    _rejected(_one(tmp_path / "corrupt.mat"), "unreadable")
    h5 = tmp_path / "other.h5"
    with h5py.File(h5, "w") as f:
        f["images"] = np.zeros((2, 2))
    _rejected(_one(h5), "not_ecg")
    (tmp_path / "broken.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 10)
    _rejected(_one(tmp_path / "broken.h5"), "unreadable")
    (tmp_path / "words.csv").write_text("a,b\nhello,world\n")
    words = _rejected(_one(tmp_path / "words.csv", ReadOptions(fs=500)), "not_ecg")
    assert "column 1, data row 1 holds 'hello', not a number" in words.detail and "--labels" in words.detail
    (tmp_path / "trunc.csv.gz").write_bytes(gzip.compress(b"1,2,3\n" * 100)[:30])
    _rejected(_one(tmp_path / "trunc.csv.gz", ReadOptions(fs=500)), "unreadable")
    (tmp_path / "blank.csv").write_text("\n\n")
    _rejected(_one(tmp_path / "blank.csv", ReadOptions(fs=500)), "empty")
    (tmp_path / "orphan.dat").write_bytes(b"\x00" * 8)
    _rejected(_one(tmp_path / "orphan.dat"), "not_ecg")
    _rejected(_one(tmp_path / "does_not_exist.hea"), "unreadable")


def test_common_formats_take_the_fast_path(sample_data, monkeypatch):
    """Format-16 .dat and Challenge .mat records never go through wfdb-python (its speed lives in
    benchmarks/bench_ingest_segment.py, not in a timed test)."""
    import ecgfm_cli.io.readers_wfdb as rw

    def refuse(*args, **kwargs):
        raise AssertionError("wfdb fallback used for a common format")

    monkeypatch.setattr(rw, "_wfdb_fallback", refuse)
    srcs = list(discover([sample_data / "ptbxl" / "records500", sample_data / "challenge2021"]))
    records = [r for s in srcs for r in read_source(s)]
    assert len(records) == 25 and all(isinstance(r, RawRecord) for r in records)
