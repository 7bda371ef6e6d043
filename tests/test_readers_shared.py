"""Readers against the full shared corpus (../shared/data; skipped when absent)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io
import wfdb

from ecgfm_cli.contract import STANDARD_LEADS
from ecgfm_cli.io.readers import ReadOptions, Source, discover, read_source
from ecgfm_cli.io.record import REASONS, RawRecord, RejectedRecord

GEORGIA_2020 = ("E00015", "E00018", "E00793")
SAMPLE_DATA = ("wfdb_python_samples", "sample-data")  # wfdb-python's format test suite: its own test below


def _in_sample_data(path) -> bool:
    parts = path.parts
    return any(parts[i:i + 2] == SAMPLE_DATA for i in range(len(parts) - 1))


def _read(src: Source, opts: ReadOptions | None = None) -> list[RawRecord]:
    recs = list(read_source(src, opts or ReadOptions()))
    bad = [f"{r.reason}: {r.detail}" for r in recs if isinstance(r, RejectedRecord)]
    assert not bad, bad
    return recs


@pytest.mark.slow
def test_every_wfdb_record_equals_wfdb(shared_data):
    srcs = [s for s in discover([shared_data]) if s.kind == "wfdb" and not _in_sample_data(s.path)]
    assert len(srcs) == 534
    n_compared = 0
    for src in srcs:
        (rec,) = _read(src, ReadOptions(store_digital=True))
        if src.path.stem in GEORGIA_2020:
            continue
        base = str(src.path.with_suffix(""))
        expected = wfdb.rdsamp(base)[0].T.astype(np.float32)
        np.testing.assert_array_equal(rec.signal, expected, err_msg=base)
        np.testing.assert_array_equal(rec.digital, wfdb.rdrecord(base, physical=False).d_signal.T, err_msg=base)
        n_compared += 1
    assert n_compared == 531


def test_georgia_2020_headers(shared_data):
    for name in GEORGIA_2020:
        hea = shared_data / "physionet_challenge_2020_2021" / "records" / f"{name}.hea"
        (rec,) = _read(Source(hea, hea.parent, "wfdb"))
        val = scipy.io.loadmat(str(hea.with_suffix(".mat")))["val"]
        np.testing.assert_array_equal(rec.signal, (val / 4880.0).astype(np.float32))
        assert rec.leads == list(STANDARD_LEADS) and rec.sample_rate == 500


def test_special_records(shared_data):
    mit = shared_data / "wfdb_python_samples" / "mitdb" / "100.hea"
    (rec,) = _read(Source(mit, shared_data, "wfdb"))
    assert rec.signal.shape == (2, 650000) and rec.leads == ["MLII", "V5"] and rec.sample_rate == 360
    ptb = shared_data / "wfdb_python_samples" / "ptbdb" / "s0010_re.hea"
    (rec,) = _read(Source(ptb, shared_data, "wfdb"))
    assert rec.n_leads == 15 and rec.age == 81 and rec.sex == "F"
    assert rec.record_id == "wfdb_python_samples/ptbdb/s0010_re"


def test_cpsc2018_mat(shared_data):
    paths = sorted((shared_data / "cpsc2018").rglob("*.mat"))
    assert len(paths) == 10
    for p in paths:
        (rec,) = _read(Source(p, shared_data / "cpsc2018", "mat"))
        data = scipy.io.loadmat(str(p))["ECG"]["data"][0, 0]
        np.testing.assert_array_equal(rec.signal, data.astype(np.float32))
        assert rec.source_format == "cpsc-mat" and rec.sex in ("M", "F") and rec.age is not None


def test_sph_h5(shared_data):
    import h5py

    paths = sorted((shared_data / "sph").glob("*.h5"))
    assert len(paths) == 10
    for p in paths:
        (rec,) = _read(Source(p, shared_data / "sph", "hdf5"))
        with h5py.File(p) as f:
            np.testing.assert_array_equal(rec.signal, f["ecg"][()].astype(np.float32))
        assert rec.record_id == p.stem


def test_ecgfm_org_mat(shared_data):
    paths = sorted((shared_data / "ecgfm_code15_reference" / "org").glob("*.mat"))
    assert len(paths) == 10
    for p in paths:
        (rec,) = _read(Source(p, p.parent, "mat"))
        m = scipy.io.loadmat(str(p))
        np.testing.assert_array_equal(rec.signal, m["feats"].astype(np.float32))
        assert rec.sample_rate == 400 and rec.source_format == "fairseq-mat"


def test_cinc2011_all_records(shared_data):
    srcs = [s for s in discover([shared_data / "cinc2011_seta" / "set-a"])]
    assert len(srcs) == 1000
    for src in srcs:
        (rec,) = _read(src, ReadOptions(fs=500))
        assert rec.signal.shape == (12, 5000) and rec.sample_rate == 500


def test_whole_corpus_rejects_only_non_ecg_files(shared_data):
    """Everything discovered reads, except label/manifest tables and the .npy label array."""
    rejected = []
    for src in discover([shared_data]):
        if (src.kind == "csv" and "set-a" in src.path.parts) or _in_sample_data(src.path) \
                or "hospital_formats" in src.path.parts:
            continue  # covered by their own tests; keeps this test fast
        for r in read_source(src, ReadOptions(fs=500)):
            if isinstance(r, RejectedRecord):
                rejected.append((src.path.name, r.reason))
    assert rejected and all(reason == "not_ecg" for _name, reason in rejected), rejected
    assert all(name.endswith((".csv", ".txt", ".npy")) for name, _reason in rejected), rejected


#: The records of wfdb-python's sample-data that ecgfm rejects, and why: their signal files are not in the copy
#: (missing_data; wfdb-python cannot read them either), a rate no ECG has (bad_sample_rate: 1 Hz, 15.5 Hz, 48 kHz
#: and the 1/60 Hz numerics records), a master whose only data segment is empty (empty), a master of 117 hours
#: (too_large: 52,725,000 samples per lead).
SAMPLE_DATA_REJECTS = {
    "1003": "missing_data", "12726": "missing_data", "n16": "missing_data",
    "drive02": "bad_sample_rate", "drive02-no-len": "bad_sample_rate", "n8_evoked_raw_95_F1_R9": "bad_sample_rate",
    "test_generator_2": "bad_sample_rate", "wave_4": "bad_sample_rate",
    "p000878-2137-10-26-16-57": "too_large", "s00001-2896-10-10-00-31": "missing_data",
    "s00001-2896-10-09-01-56": "empty", "s00001-2896-10-09-01-56n": "bad_sample_rate",
    "s00001-2896-10-10-00-31n": "bad_sample_rate", "s25047-2704-05-04-10-44n": "bad_sample_rate",
}


@pytest.mark.slow
def test_wfdb_python_sample_data_equals_rdsamp(shared_data):
    """Every record of wfdb-python's own test suite is read once, equal to ``wfdb.rdsamp`` (values, lead names,
    units), or rejected with its reason; the segments of a multi-segment record are read through their master only.
    """
    root = shared_data.joinpath(*SAMPLE_DATA)
    srcs = [s for s in discover([root]) if s.kind == "wfdb"]
    heads = sorted(root.rglob("*.hea"))
    segments = set()
    for hea in heads:
        h = wfdb.rdheader(str(hea.with_suffix("")))
        if isinstance(h, wfdb.MultiRecord):
            segments.update(p for name in h.seg_name if name != "~" and (p := hea.parent / f"{name}.hea").exists())
    assert len(segments) == 41 + 4  # of the 6 masters: 41 data segments and 4 layout headers are in the copy
    assert {s.path for s in srcs} == set(heads) - segments  # a segment is no record of its own
    rejected, n_read = {}, 0
    for src in srcs:
        (rec,) = list(read_source(src, ReadOptions()))
        if isinstance(rec, RejectedRecord):
            assert rec.reason in REASONS and rec.detail, rec
            rejected[src.path.stem] = rec.reason
            continue
        signal, fields = wfdb.rdsamp(str(src.path.with_suffix("")))
        np.testing.assert_array_equal(rec.signal, signal.T.astype(np.float32), err_msg=str(src.path))
        assert rec.leads == fields["sig_name"], src.path
        assert rec.units == fields["units"], src.path
        n_read += 1
    assert rejected == SAMPLE_DATA_REJECTS
    assert n_read == len(srcs) - len(SAMPLE_DATA_REJECTS) == 29
    (m041,) = [s for s in srcs if s.path.stem == "041s"]
    (rec,) = list(read_source(m041, ReadOptions()))
    assert rec.leads[:3] == ["III", "I", "V"] and rec.units[:3] == ["mV"] * 3
