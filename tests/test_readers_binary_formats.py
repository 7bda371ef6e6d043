"""DICOM, SCP-ECG, EDF/EDF+/BDF and ISHNE readers; format detection by content (issue #12)."""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecgfm_cli.contract import canonical_lead
from ecgfm_cli.io.detect import sniff, sniff_bytes, xml_root
from ecgfm_cli.io.readers import ReadOptions, Source, read_path, read_source
from ecgfm_cli.io.readers_scp import huffman_decode, undo_differences
from ecgfm_cli.io.record import RawRecord, RejectedRecord
from tests.scp_writer import OWN_TABLE, write_ishne, write_scp

HOSP = Path(__file__).resolve().parents[1] / "sample_data" / "hospital_formats"
DICOM = HOSP / "dicom" / "anonymous_ecg.dcm"
SCP_FILES = sorted((HOSP / "scp_ecg").glob("*.SCP"))


def read_one(path: Path, opts: ReadOptions | None = None):
    out = list(read_source(Source(path, path, "sniff"), opts))
    assert len(out) == 1, out
    return out[0]


def limb_identities(rec: RawRecord) -> tuple[float, float]:
    """max |I + III - II| and max |aVR + aVL + aVF| over the record, mV."""
    idx = {canonical_lead(n): i for i, n in enumerate(rec.leads)}
    s = rec.signal.astype(np.float64)
    e = np.abs(s[idx["I"]] + s[idx["III"]] - s[idx["II"]]).max()
    g = np.abs(s[idx["aVR"]] + s[idx["aVL"]] + s[idx["aVF"]]).max()
    return float(e), float(g)


# ---------------------------------------------------------------- DICOM


def test_dicom_equals_pydicom_rhythm_group_in_mv():
    import pydicom

    rec = read_one(DICOM)
    ds = pydicom.dcmread(DICOM)
    labels = [str(g.MultiplexGroupLabel) for g in ds.WaveformSequence]
    rhythm = labels.index("RHYTHM")
    ref = ds.waveform_array(rhythm).T / 1000.0  # pydicom: uV (the channel sensitivity units)
    assert rec.source_format == "dicom-ecg" and rec.signal.shape == ref.shape
    np.testing.assert_array_equal(rec.signal, ref.astype(np.float32))
    assert rec.sample_rate == float(ds.WaveformSequence[rhythm].SamplingFrequency)
    assert rec.leads == ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    assert rec.units == ["mV"] * 12


def test_dicom_limb_identities_within_quantisation():
    rec = read_one(DICOM)
    import pydicom

    quantum = float(pydicom.dcmread(DICOM).WaveformSequence[0].ChannelDefinitionSequence[0].ChannelSensitivity) / 1e3
    e, g = limb_identities(rec)
    assert e <= 1.5 * quantum and g <= 1.5 * quantum, (e, g, quantum)


def test_dicom_units_correction_and_baseline_as_pydicom(tmp_path):
    import pydicom

    ds = pydicom.dcmread(DICOM)
    g = ds.WaveformSequence[0]
    ch0, ch1 = g.ChannelDefinitionSequence[0], g.ChannelDefinitionSequence[1]
    ch0.ChannelSensitivityUnitsSequence[0].CodeValue = "mV"
    ch0.ChannelSensitivity = "0.005"
    ch1.ChannelSensitivityCorrectionFactor = "1.1"
    ch1.ChannelBaseline = "-20"
    path = tmp_path / "x.dcm"
    ds.save_as(path)
    rec = read_one(path)
    ref = pydicom.dcmread(path).waveform_array(0).T
    np.testing.assert_allclose(rec.signal[0], (ref[0]).astype(np.float32), rtol=1e-6)  # already mV
    np.testing.assert_allclose(rec.signal[1], (ref[1] / 1000).astype(np.float32), rtol=1e-6)


def test_dicom_median_beat_never_chosen_even_if_first(tmp_path):
    import pydicom

    ds = pydicom.dcmread(DICOM)
    ds.WaveformSequence = pydicom.Sequence([ds.WaveformSequence[1], ds.WaveformSequence[0]])
    path = tmp_path / "swapped"  # no extension: found by content
    ds.save_as(path)
    (rec,) = read_path(tmp_path)
    assert isinstance(rec, RawRecord) and rec.n_samples == 10000 and rec.comments["waveform_group"] == "1:RHYTHM"


def test_dicom_identifiers_kept_out_of_record_fields():
    rec = read_one(DICOM)
    assert rec.identifiers["mrn"] == "642341" and rec.identifiers["birth_date"] == "1971-01-23"
    assert rec.patient_id is None and rec.age == 42.0 and rec.sex == "F"
    flat = " ".join([*rec.comments.values(), *rec.dx_codes])
    assert "642341" not in flat and "Galliera" not in flat


def test_dicom_without_waveform_is_not_ecg(tmp_path):
    import pydicom

    ds = pydicom.dcmread(DICOM)
    del ds.WaveformSequence
    ds.save_as(tmp_path / "img.dcm")
    r = read_one(tmp_path / "img.dcm")
    assert isinstance(r, RejectedRecord) and r.reason == "not_ecg" and "without a waveform" in r.detail


# ---------------------------------------------------------------- SCP-ECG


@pytest.mark.parametrize("path", SCP_FILES, ids=lambda p: p.name)
def test_scp_sample_files(path):
    rec = read_one(path)
    assert rec.source_format == "scp-ecg" and rec.sample_rate == 600.0 and rec.signal.shape == (12, 6000)
    assert rec.comments["derived_leads"] == "III,aVR,aVL,aVF"
    assert np.isfinite(rec.signal).all()
    # physiological amplitudes (a wrong AVM or a Huffman slip gives volts or drift): QRS of 0.3-5 mV
    span = np.ptp(rec.signal[:8], axis=1)
    assert (span > 0.3).all() and (span < 5).all(), span
    e, g = limb_identities(rec)
    assert e < 1e-5 and g < 1e-5
    assert rec.identifiers["mrn"] and rec.identifiers["name"] and rec.patient_id is None
    assert rec.base_datetime.startswith(path.name[4:8])  # ECG_YYYYMMDD_...


def test_scp_pediatric_lead_set_names():
    rec = read_one(HOSP / "scp_ecg" / "ECG_20060620_112352_FINAL001.SCP")
    assert rec.leads[:8] == ["I", "II", "V3R", "V1", "V2", "V4", "V6", "V7"]


def _walk(rng, n_leads, n, step=30):
    return np.cumsum(rng.integers(-step, step + 1, size=(n_leads, n)), axis=1)


@pytest.mark.parametrize("tables", ["default", "own", None])
@pytest.mark.parametrize("order", [0, 1, 2])
def test_scp_roundtrip_every_encoding(tmp_path, tables, order):
    rng = np.random.default_rng(order)
    data = _walk(rng, 3, 1200)
    data[:, 100] += 3000  # a spike: the 16-bit escape
    path = tmp_path / "x.scp"
    write_scp(path, [1, 2, 3], data, avm=2500, interval=2000, order=order, tables=tables)
    rec = read_one(path, ReadOptions(store_digital=True))
    assert rec.sample_rate == 500.0 and rec.leads[:3] == ["I", "II", "V1"]
    np.testing.assert_array_equal(rec.signal[:3], (data * 2.5e-3).astype(np.float32))


@pytest.mark.parametrize("order", [1, 2])
def test_scp_reference_beat_added_back_in_zones(tmp_path, order):
    rng = np.random.default_rng(7)
    n, m = 2000, 300
    ref = _walk(rng, 2, m, 60)
    data = _walk(rng, 2, n, 5)
    zones, fcm = [(101, 201, 380), (901, 1001, 1180), (1601, 1701, 1880)], 101
    for sb, fc, se in zones:  # a beat that equals the reference inside each zone
        data[:, sb - 1:se] += ref[:, sb - fc + fcm - 1:se - fc + fcm]
    path = tmp_path / "ref.scp"
    write_scp(path, [1, 2], data, order=order, ref=ref, zones=zones, fcm=fcm)
    rec = read_one(path)
    np.testing.assert_array_equal(rec.signal[:2], (data * 5e-3).astype(np.float32))
    e, g = limb_identities(rec)
    assert e < 1e-5 and g < 1e-5


def test_scp_reference_beat_subtraction_matters(tmp_path):
    """The file holds residuals: reading it without adding the beat back would differ (guards the add-back)."""
    rng = np.random.default_rng(3)
    ref = _walk(rng, 1, 200, 80)
    data = _walk(rng, 1, 1000, 5)
    data[:, 300:500] += ref
    path = tmp_path / "r.scp"
    write_scp(path, [1], data, ref=ref, zones=[(301, 351, 500)], fcm=51)
    rec = read_one(path)
    np.testing.assert_array_equal(rec.signal, (data * 5e-3).astype(np.float32))


def test_scp_corrupt_crc_and_truncation_are_rejects(tmp_path):
    src = SCP_FILES[0].read_bytes()
    flipped = bytearray(src)
    flipped[5000] ^= 0x40
    (tmp_path / "flip.scp").write_bytes(bytes(flipped))
    (tmp_path / "cut.scp").write_bytes(src[:10000])
    r1, r2 = read_one(tmp_path / "flip.scp"), read_one(tmp_path / "cut.scp")
    assert r1.reason == "unreadable" and "CRC" in r1.detail
    assert r2.reason == "unreadable" and "truncated" in r2.detail


def test_scp_too_large_checked_before_decoding(tmp_path):
    r = read_one(SCP_FILES[0], ReadOptions(max_samples=1000))
    assert isinstance(r, RejectedRecord) and r.reason == "too_large"


def test_scp_identifiers_and_statements(tmp_path):
    path = tmp_path / "p.scp"
    write_scp(path, [1, 2], _walk(np.random.default_rng(0), 2, 500), patient={
        "last": "Doe", "first": "Jane", "id": "MRN12345", "physician": "Dr Who", "birth": (1950, 2, 3), "sex": 2},
        statements=["Sinus rhythm", "Confirmed by Doe, Jane (MRN12345) on 05/10/2021"])
    rec = read_one(path)
    assert rec.identifiers["name"] == "Doe Jane" and rec.identifiers["mrn"] == "MRN12345"
    assert rec.identifiers["birth_date"] == "1950-02-03" and rec.identifiers["persons"] == "Dr Who"
    assert rec.sex == "F" and rec.base_datetime == "2020-05-17 09:30:15"
    assert rec.dx_codes == ["Sinus rhythm"]
    flat = " ".join([*rec.comments.values(), *rec.dx_codes, str(rec.patient_id)])
    for s in ("Doe", "Jane", "MRN12345", "Who", "1950"):
        assert s not in flat


def test_huffman_decoder_rejects_invalid_code_and_short_stream():
    # own table: '1111' + 16 bits is the longest code; '0' = 0. 0xFF 0xFF cuts a 16-bit escape short.
    with pytest.raises(RejectedRecord, match="end"):
        huffman_decode(b"\xff\xff", 1, [OWN_TABLE], "x")
    sparse = ((1, 1, 1, 0, 0), (2, 2, 1, 1, 0b01))  # '0' -> 0, '10' -> 1; '11' is no code
    with pytest.raises(RejectedRecord, match="invalid Huffman code"):
        huffman_decode(b"\xc0", 2, [sparse], "x")


def test_second_differences_inverse():
    x = np.array([5, -3, 10, 7, 7, 0, -20, 4], dtype=np.int64)
    d = x.copy()
    d[2:] = x[2:] - 2 * x[1:-1] + x[:-2]
    np.testing.assert_array_equal(undo_differences(d, 2), x)


# ---------------------------------------------------------------- EDF / EDF+ / BDF


def _write_edf(path: Path, bdf: bool = False, rates=(500, 500, 500, 100)):
    import pyedflib

    labels = ["ECG I", "ECG II", "EKG V1", "EEG Fpz-Cz"]
    dims = ["uV", "mV", "uV", "uV"]
    ft = pyedflib.FILETYPE_BDFPLUS if bdf else pyedflib.FILETYPE_EDFPLUS
    w = pyedflib.EdfWriter(str(path), len(labels), file_type=ft)
    rng = np.random.default_rng(1)
    data = []
    for i, (lab, dim, fs) in enumerate(zip(labels, dims, rates, strict=True)):
        w.setSignalHeader(i, {"label": lab, "dimension": dim, "sample_frequency": fs,
                              "physical_max": 5000.0 if dim == "uV" else 5.0,
                              "physical_min": -5000.0 if dim == "uV" else -5.0,
                              "digital_max": 8388607 if bdf else 32767, "digital_min": -8388608 if bdf else -32768,
                              "transducer": "", "prefilter": ""})
        x = np.cumsum(rng.normal(0, 20 if dim == "uV" else 0.02, 10 * fs))
        data.append(np.clip(x, -4000 if dim == "uV" else -4, 4000 if dim == "uV" else 4))
    w.setPatientCode("MRN777")
    w.setPatientName("Jane_Roe")
    w.writeSamples(data)
    w.writeAnnotation(1.5, 0.5, "artefact")
    w.writeAnnotation(4.0, -1, "Sinus rhythm")
    w.close()


@pytest.mark.parametrize("bdf", [False, True])
def test_edf_equals_pyedflib_in_mv(tmp_path, bdf):
    import pyedflib

    path = tmp_path / ("x.bdf" if bdf else "x.edf")
    _write_edf(path, bdf)
    rec = read_one(path)
    assert rec.source_format == ("bdf" if bdf else "edf")
    assert rec.leads == ["I", "II", "V1"] and rec.sample_rate == 500.0 and rec.units == ["mV"] * 3
    f = pyedflib.EdfReader(str(path))
    try:
        expect = [f.readSignal(0) / 1000, f.readSignal(1), f.readSignal(2) / 1000]
    finally:
        f.close()
    for row, x in zip(rec.signal, expect, strict=True):
        np.testing.assert_allclose(row, x.astype(np.float32), rtol=1e-6, atol=1e-9)
    assert rec.comments["other_channels"] == "EEG Fpz-Cz"
    assert "1.5/0.5/artefact" in rec.comments["annotations"] and "Sinus rhythm" in rec.comments["annotations"]
    assert rec.identifiers["mrn"] == "MRN777" and rec.identifiers["name"] == "Jane Roe"


def test_edf_ecg_channels_at_two_rates_become_two_records(tmp_path):
    path = tmp_path / "two.edf"
    _write_edf(path, rates=(500, 500, 250, 100))
    recs = read_path(path)
    assert [r.record_id for r in recs] == ["two#500Hz", "two#250Hz"]
    assert [r.leads for r in recs] == [["I", "II"], ["V1"]]


def test_edf_without_ecg_is_not_ecg(tmp_path):
    import pyedflib

    path = tmp_path / "eeg.edf"
    w = pyedflib.EdfWriter(str(path), 1, file_type=pyedflib.FILETYPE_EDFPLUS)
    w.setSignalHeader(0, {"label": "EEG C3", "dimension": "uV", "sample_frequency": 100, "physical_max": 100.0,
                          "physical_min": -100.0, "digital_max": 32767, "digital_min": -32768})
    w.writeSamples([np.zeros(1000)])
    w.close()
    r = read_one(path)
    assert r.reason == "not_ecg" and "EEG C3" in r.detail


# ---------------------------------------------------------------- ISHNE


def test_ishne_reads_resolution_leads_and_header(tmp_path):
    rng = np.random.default_rng(2)
    data = np.clip(_walk(rng, 3, 4000, 20), -30000, 30000).astype(np.int16)
    path = tmp_path / "holter.ecg"
    write_ishne(path, data, specs=[5, 6, 11], res_nv=[2500, 5000, 2500], fs=200)
    rec = read_one(path)
    assert rec.source_format == "ishne" and rec.leads == ["I", "II", "V1"] and rec.sample_rate == 200.0
    np.testing.assert_array_equal(rec.signal, (data * np.array([2.5e-3, 5e-3, 2.5e-3])[:, None]).astype(np.float32))
    assert rec.identifiers == {"name": "Jane Roe", "mrn": "MRN0042", "birth_date": "1950-04-03"}
    assert rec.sex == "F" and rec.base_datetime == "2020-05-17 09:30:00"


def test_ishne_crc_and_size_checked(tmp_path):
    data = np.zeros((2, 1000), dtype=np.int16)
    path = tmp_path / "a.ecg"
    write_ishne(path, data, specs=[5, 6], res_nv=[5000, 5000])
    raw = bytearray(path.read_bytes())
    (tmp_path / "short.ecg").write_bytes(bytes(raw[:3000]))
    raw[40] ^= 1  # inside the first name
    (tmp_path / "crc.ecg").write_bytes(bytes(raw))
    assert read_one(tmp_path / "short.ecg").reason == "size_mismatch"
    r = read_one(tmp_path / "crc.ecg")
    assert r.reason == "unreadable" and "CRC" in r.detail


# ---------------------------------------------------------------- detection


def test_sniff_each_format(tmp_path):
    assert sniff(DICOM).fmt == "dicom"
    assert all(sniff(p).fmt == "scp" for p in SCP_FILES)
    _write_edf(tmp_path / "a.edf")
    _write_edf(tmp_path / "b.bdf", bdf=True)
    assert sniff(tmp_path / "a.edf").fmt == "edf" and sniff(tmp_path / "b.bdf").fmt == "bdf"
    write_ishne(tmp_path / "c.ecg", np.zeros((1, 10), np.int16), [5], [5000])
    assert sniff(tmp_path / "c.ecg").fmt == "ishne"
    assert sniff_bytes(b"0       " + b" " * 300, 400) is None  # EDF version field without the header arithmetic
    assert sniff_bytes(b"hello", 5) is None


@pytest.mark.parametrize("enc", ["utf-8", "utf-8-sig", "utf-16"])
def test_xml_root_after_prolog_comments_doctype(enc):
    text = ('<?xml version="1.0"?>\n<!-- exported -->\n<!DOCTYPE RestingECG SYSTEM "restecg.dtd" [ <!ENTITY a "b"> ]>'
            '\n<?pi x?>\n<RestingECG><x/></RestingECG>')
    det = sniff_bytes(text.encode(enc), 1000)
    assert det.fmt == "xml" and det.root == "RestingECG"
    assert xml_root('<ns:AnnotatedECG xmlns:ns="urn:hl7-org:v3">') == "AnnotatedECG"


def test_non_ecg_xml_is_not_ecg_naming_its_root(tmp_path):
    (tmp_path / "export.xml").write_text('<?xml version="1.0"?><PatientList><p/></PatientList>')
    (r,) = read_path(tmp_path)
    assert r.reason == "not_ecg" and "<PatientList>" in r.detail


def test_folder_with_no_and_odd_extensions_found_by_content(tmp_path):
    shutil.copy(DICOM, tmp_path / "IM000001")  # DICOM files often have no extension
    shutil.copy(SCP_FILES[1], tmp_path / "ecg.001")
    write_ishne(tmp_path / "holter.ecg", np.zeros((1, 400), np.int16), [6], [5000])
    (tmp_path / "notes").write_text("nothing to see")
    (tmp_path / "layout.kml").write_text('<?xml version="1.0"?><kml/>')  # some tool's XML: not an ECG reject
    got = {r.record_id: r for r in read_path(tmp_path)}
    assert set(got) == {"IM000001", "ecg", "holter"}
    assert [got[k].source_format for k in ("IM000001", "ecg", "holter")] == ["dicom-ecg", "scp-ecg", "ishne"]


def test_xml_extension_is_not_trusted(tmp_path):
    shutil.copy(SCP_FILES[0], tmp_path / "looks_like.xml")
    (r,) = read_path(tmp_path)
    assert isinstance(r, RawRecord) and r.source_format == "scp-ecg"


# ---------------------------------------------------------------- safe parsing: fuzz


def _fuzz_inputs(tmp: Path) -> dict[str, bytes]:
    _write_edf(tmp / "f.edf")
    write_ishne(tmp / "f.ecg", np.arange(600, dtype=np.int16).reshape(2, 300), [5, 6], [5000, 5000])
    write_scp(tmp / "f.scp", [1, 2], _walk(np.random.default_rng(0), 2, 300), order=2, tables="own")
    return {"scp": SCP_FILES[0].read_bytes(), "scp_own": (tmp / "f.scp").read_bytes(), "dicom": DICOM.read_bytes(),
            "edf": (tmp / "f.edf").read_bytes(), "ishne": (tmp / "f.ecg").read_bytes()}


@pytest.fixture(scope="module")
def fuzz_inputs(tmp_path_factory):
    return _fuzz_inputs(tmp_path_factory.mktemp("fuzz"))


def _no_crash(tmp: Path, name: str, data: bytes) -> None:
    path = tmp / name
    path.write_bytes(data)
    out = list(read_source(Source(path, path, "sniff"), ReadOptions(max_samples=1 << 20)))
    assert out and all(isinstance(r, RawRecord | RejectedRecord) for r in out)
    for r in out:  # read_source's catch-all ("name: SomeError: ...") would mean a reader let an exception out
        assert not (isinstance(r, RejectedRecord) and re.match(rf"{re.escape(name)}: \w+(Error|Exception): ",
                                                                 r.detail)), r.detail


@pytest.mark.parametrize("fmt", ["scp", "scp_own", "dicom", "edf", "ishne"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_truncations_and_byte_flips(fmt, fuzz_inputs, tmp_path, data):
    raw = bytearray(fuzz_inputs[fmt])
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    for _ in range(data.draw(st.integers(0, 6))):
        if raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    _no_crash(tmp_path, f"x.{fmt}", bytes(raw))


@pytest.mark.parametrize("declared, reason", [(2**31, "too_large"), (10**6, "unreadable")])
def test_scp_hostile_huge_declared_lengths(tmp_path, declared, reason):
    """A valid-CRC SCP whose section 3 declares more samples than --max-samples allows, or more than its data can
    hold (each code is >= 1 bit), is rejected before any per-sample allocation."""
    path = tmp_path / "h.scp"
    write_scp(path, [1], np.zeros((1, 10), np.int64))
    raw = bytearray(path.read_bytes())
    # rewrite section 3's end sample and fix the CRCs the way a hostile writer would
    from ecgfm_cli.io.readers_scp import crc_ccitt, split_sections

    body3 = split_sections(bytes(raw), "h")[3]
    at = bytes(raw).index(body3)
    struct.pack_into("<I", raw, at + 2 + 4, declared)
    sec_start = at - 16
    (slen,) = struct.unpack_from("<I", raw, sec_start + 4)
    struct.pack_into("<H", raw, sec_start, crc_ccitt(bytes(raw[sec_start + 2:sec_start + slen])))
    struct.pack_into("<H", raw, 0, crc_ccitt(bytes(raw[2:])))
    path.write_bytes(bytes(raw))
    r = read_one(path)
    assert r.reason == reason and (reason == "too_large" or "samples declared" in r.detail), r.detail


# ---------------------------------------------------------------- end to end


def test_ingest_segment_mixed_hospital_folder(tmp_path, capsys):
    """``ecgfm ingest hospital_formats/ | ecgfm segment``: every ECG file is read or rejected with a reason."""
    import pyarrow.parquet as pq

    from tests.conftest import run_main

    mixed = tmp_path / "mixed"
    shutil.copytree(HOSP, mixed)
    _write_edf(mixed / "holter.edf")
    write_ishne(mixed / "holter2.ecg", _walk(np.random.default_rng(0), 2, 3000).astype(np.int16), [5, 6], [5000] * 2)
    (tmp_path / "key").write_text("a-secret-of-more-than-16-bytes\n")
    code, err = run_main(capsys, "ingest", mixed, "-o", tmp_path / "rec", "--id-key", tmp_path / "key")
    assert code == 0, err
    code, err = run_main(capsys, "segment", tmp_path / "rec", "-o", tmp_path / "seg")
    assert code == 0, err
    recs = pq.read_table(next((tmp_path / "rec").glob("records-*.parquet")), columns=["source_format"])
    rejects = pq.read_table(next((tmp_path / "rec").glob("rejects-*.parquet"))).to_pylist()
    formats = set(recs.column("source_format").to_pylist())
    assert {"dicom-ecg", "scp-ecg", "edf", "ishne"} <= formats, formats
    ecg_files = [p for p in mixed.rglob("*") if p.is_file() and sniff(p) is not None]
    assert recs.num_rows + sum(r["reason"] not in ("ignored",) and sniff(Path(r["source_path"])) is not None
                               for r in rejects) >= len(ecg_files)
    assert all(r["detail"] for r in rejects)
    assert list((tmp_path / "seg").glob("segments-*.parquet"))


def test_sniffing_never_opens_a_fifo(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe")  # no extension: a candidate for sniffing, which must not block on it
    assert sniff(tmp_path / "pipe") is None
    assert read_path(tmp_path) == []


def test_scp_leads_decoded_in_bounded_batches(monkeypatch, tmp_path):
    """Leads are decoded together only up to a bit budget (memory stays bounded on huge files); the result is the
    same either way."""
    import ecgfm_cli.io.readers_scp as scp

    rng = np.random.default_rng(5)
    data = _walk(rng, 4, 800)
    path = tmp_path / "b.scp"
    write_scp(path, [1, 2, 3, 4], data)
    whole = read_one(path).signal
    monkeypatch.setattr(scp, "_BATCH_BITS", 64)
    np.testing.assert_array_equal(read_one(path).signal, whole)
    np.testing.assert_array_equal(whole[:4], (data * 5e-3).astype(np.float32))
