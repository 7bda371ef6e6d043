"""Hospital XML readers (GE MUSE, Philips Sierra, HL7 aECG): values, identities, safe parsing, fuzzing."""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecgfm_cli.io.readers import ReadOptions
from ecgfm_cli.io.readers_xml import (
    lzw_decode,
    measurement_labels,
    read_hl7_aecg,
    read_muse,
    read_philips,
    xli_decode,
)
from ecgfm_cli.io.record import RawRecord, RejectedRecord

HOSP = Path(__file__).resolve().parents[1] / "sample_data" / "hospital_formats"
MUSE = sorted((HOSP / "ge_muse").glob("*.xml"))
PHILIPS = sorted((HOSP / "philips_sierra").glob("*.[xX][mM][lL]"))
HL7_12 = [HOSP / "hl7_aecg" / "subject1_0.xml"]
READERS = {"ge_muse": read_muse, "philips_sierra": read_philips, "hl7_aecg": read_hl7_aecg}
TWELVE = [(read_muse, p) for p in MUSE] + [(read_philips, p) for p in PHILIPS] + [(read_hl7_aecg, p) for p in HL7_12]


def _one(reader, path: Path, opts=None) -> RawRecord:
    recs = list(reader(path, path.stem, opts))
    assert len(recs) == 1
    return recs[0]


def _lsb(rec: RawRecord) -> float:
    """Quantisation step (mV) of the record's stored leads."""
    d = np.diff(np.unique(rec.signal[rec.leads.index("I")].astype(np.float64)))
    return float(d[d > 1e-9].min())


def _identities(rec: RawRecord) -> tuple[float, float]:
    s = {n: rec.signal[i].astype(np.float64) for i, n in enumerate(rec.leads)}
    return (float(np.abs(s["I"] + s["III"] - s["II"]).max()),
            float(np.abs(s["aVR"] + s["aVL"] + s["aVF"]).max()))


def _shared_twelve() -> list:
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "hospital_formats"
    out = [(read_muse, p) for p in sorted((root / "ge_muse").glob("*.xml"))]
    out += [(read_philips, p) for p in sorted((root / "philips_sierra").glob("*.[xX][mM][lL]"))]
    out += [(read_hl7_aecg, root / "hl7_aecg" / n) for n in ("Example aECG.xml", "subject1_0.xml")]
    return [pytest.param(r, p, id=p.name) for r, p in out if p.is_file()]


@pytest.mark.parametrize("reader,path", [pytest.param(r, p, id=p.name) for r, p in TWELVE])
def test_twelve_lead_identities_hold_on_every_sample_file(reader, path):
    """Einthoven (I + III = II) and Goldberger (aVR + aVL + aVF = 0) within quantisation: a swapped lead, a wrong
    unit or a wrong decompression breaks them by far more than a few counts."""
    rec = _one(reader, path)
    assert rec.leads[:12] == ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    assert rec.signal.dtype == np.float32 and rec.units == ["mV"] * 12
    lsb = _lsb(rec)
    einthoven, goldberger = _identities(rec)
    # Philips codes III/aVR/aVL/aVF as residuals with floor(x / 2) predictions (up to 3 counts off); MUSE and
    # HL7 derive or store them exactly (half a count of rounding)
    assert einthoven <= 3 * lsb + 1e-6 and goldberger <= 3 * lsb + 1e-6, (einthoven, goldberger, lsb)
    amp = np.abs(rec.signal).max()
    assert 0.3 < amp < 10, amp  # mV: a factor-1000 unit error would show here


@pytest.mark.shared
@pytest.mark.parametrize("reader,path", _shared_twelve())
def test_identities_on_every_shared_file(reader, path, shared_data):
    rec = _one(reader, path)
    einthoven, goldberger = _identities(rec)
    assert einthoven <= 3 * _lsb(rec) + 1e-6 and goldberger <= 3 * _lsb(rec) + 1e-6


def _philips_files() -> list:
    files = list(PHILIPS)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "hospital_formats" / "philips_sierra"
    files += sorted(p for p in shared.glob("*.[xX][mM][lL]") if p.name not in {f.name for f in files})
    return [pytest.param(p, id=p.name) for p in files]


@pytest.mark.parametrize("path", _philips_files())
def test_philips_equals_sierraecg(path):
    """Our XLI decoder and limb-lead restoration give exactly what the sierraecg package gives, in mV x 1000 / 5;
    the calibration pulse after the ECG is cut (and said so)."""
    sierraecg = pytest.importorskip("sierraecg")
    rec = _one(read_philips, path)
    ref = sierraecg.read_file(str(path))
    assert [lead.label for lead in ref.leads] == rec.leads
    res_uv = 5.0
    want = np.stack([lead.samples.astype(np.float64) for lead in ref.leads]) * res_uv / 1000
    cut = int(rec.comments["calibration_samples_removed"])
    assert want.shape[1] == rec.n_samples + cut and 0 < cut <= 500
    np.testing.assert_array_equal(rec.signal, want[:, : rec.n_samples].astype(np.float32))
    tail = want[:, rec.n_samples:]
    assert (tail == tail[:1]).all()  # every lead the same there: the pulse and its zeros, no ECG
    assert rec.sample_rate == 500


def test_philips_reads_utf16_and_both_resolution_fields():
    v104 = _one(read_philips, HOSP / "philips_sierra" / "3191723_ZZDEMOPTONLY_1-04_orig.xml")
    v103 = _one(read_philips, HOSP / "philips_sierra" / "129DYPRG.XML")
    assert (HOSP / "philips_sierra" / "3191723_ZZDEMOPTONLY_1-04_orig.xml").read_bytes()[:2] == b"\xff\xfe"
    assert v104.comments["document"] == "PhilipsECG 1.04" and v103.comments["document"] == "SierraECG 1.03"
    assert v104.dx_codes == ["SR", "LVHCNP", "STELVH"]
    assert v103.comments["qrs_duration_ms"] == "135" and v103.comments["heart_rate_bpm"] == "41"
    assert v104.identifiers["birth_date"] == "1950-01-01" and v104.age is None  # deid derives it
    assert v104.base_datetime == "2010-01-19T15:19:22"


def test_xli_decoder_rejects_garbage_quickly():
    with pytest.raises(RejectedRecord):
        xli_decode(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"\xff" * 4, 100)  # chunk runs past the data
    with pytest.raises(RejectedRecord, match="more than"):
        lzw_decode(bytes(range(256)) * 40, 50)  # output bound enforced while decoding


def test_muse_derives_four_limb_leads_exactly_and_flags_them():
    rec = _one(read_muse, MUSE[0], ReadOptions(store_digital=True))
    assert rec.comments["derived_leads"] == "III,aVR,aVL,aVF"
    assert rec.sample_rate == 500 and rec.n_samples == 5000
    # lossless: physical = (digital - baseline) / gain, in half-counts of 4.88 uV
    np.testing.assert_allclose(rec.digital / np.array(rec.gain)[:, None], rec.signal, rtol=1e-6, atol=1e-6)
    raw = re.search(rb"<WaveformType>Rhythm</WaveformType>.*?<WaveFormData>([^<]*)", MUSE[0].read_bytes(), re.S)
    lead_i = np.frombuffer(base64.b64decode(b"".join(raw.group(1).split())), "<i2")
    np.testing.assert_allclose(rec.signal[0], lead_i * 4.88e-3, rtol=1e-6)
    assert rec.dx_codes == ["Ventricular-paced rhythm", "When compared with ECG of [date]", "No significant change."]
    assert measurement_labels(rec.comments)["qrs_duration_ms"] == 78.0
    assert rec.age == 60 and rec.sex == "M" and rec.base_datetime == "2021-05-10T13:15:18"
    assert "Doe" not in str(rec.dx_codes) + str(rec.comments) and "Doe, John" in rec.identifiers["other"]


def test_muse_crc_mismatch_and_missing_rhythm_are_rejects(tmp_path):
    text = MUSE[0].read_text("latin-1")
    i = text.index("<WaveformType>Rhythm")
    j = text.index("<WaveFormData>", i) + len("<WaveFormData>") + 5
    bad = tmp_path / "crc.xml"
    bad.write_text(text[:j] + ("B" if text[j] != "B" else "C") + text[j + 1:], "latin-1")
    with pytest.raises(RejectedRecord, match="CRC32") as e:
        list(read_muse(bad, "crc", None))
    assert e.value.reason == "unreadable"
    median_only = tmp_path / "median.xml"
    median_only.write_text(text.replace("<WaveformType>Rhythm", "<WaveformType>Other"), "latin-1")
    with pytest.raises(RejectedRecord, match="no Rhythm waveform") as e:
        list(read_muse(median_only, "m", None))
    assert e.value.reason == "not_ecg"


_HL7_HEAD = '<AnnotatedECG xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
_HL7_MIN = _HL7_HEAD + """<component><series><code code="RHYTHM"/><component><sequenceSet>
<component><sequence><code code="TIME_ABSOLUTE"/><value xsi:type="GLIST_TS"><head value="20021122091000"/>
<increment value="{inc}" unit="{unit}"/></value></sequence></component>
<component><sequence><code code="MDC_ECG_LEAD_II"/><value xsi:type="SLIST_PQ"><origin value="{origin}" unit="mV"/>
<scale value="2.5" unit="uV"/><digits>-2 -2 4
 8 -9</digits></value></sequence></component></sequenceSet></component></series></component></AnnotatedECG>"""


def test_hl7_rhythm_series_and_rejects(tmp_path):
    rec = _one(read_hl7_aecg, HL7_12[0])
    assert rec.sample_rate == 500 and rec.n_samples == 5000  # the rhythm series, not the 599-sample median beat
    assert rec.dx_codes == ["MDC_ECG_RHY_SINUS_RHY"] and rec.age == 46 and rec.identifiers["mrn"] == "subject1"
    (tmp_path / "empty.xml").write_text(_HL7_HEAD + "</AnnotatedECG>")
    with pytest.raises(RejectedRecord, match="without a RHYTHM series") as e:
        list(read_hl7_aecg(tmp_path / "empty.xml", "empty", None))
    assert e.value.reason == "not_ecg"
    (tmp_path / "min.xml").write_text(_HL7_MIN.format(inc=2, unit="ms", origin=0.5))
    tiny = _one(read_hl7_aecg, tmp_path / "min.xml", ReadOptions(store_digital=True))
    assert tiny.leads == ["II"] and tiny.sample_rate == 500 and tiny.base_datetime == "2002-11-22T09:10:00"
    np.testing.assert_allclose(tiny.signal[0], 0.5 + np.array([-2, -2, 4, 8, -9]) * 2.5e-3, rtol=1e-6)
    assert tiny.baseline == [-200] and tiny.gain == [400.0]  # (digital - baseline) / gain = origin + scale x digits
    (tmp_path / "norate.xml").write_text(_HL7_MIN.format(inc=0, unit="s", origin=0))
    with pytest.raises(RejectedRecord) as e:
        list(read_hl7_aecg(tmp_path / "norate.xml", "n", None))
    assert e.value.reason == "bad_sample_rate"


@pytest.mark.shared
def test_hl7_shared_minimum_and_empty(shared_data):
    folder = shared_data / "hospital_formats" / "hl7_aecg"
    tiny = _one(read_hl7_aecg, folder / "minimum_aecg.xml")  # 13 samples: segment rejects it as too_short
    assert tiny.leads == ["II"] and tiny.n_samples == 13
    with pytest.raises(RejectedRecord) as e:
        list(read_hl7_aecg(folder / "empty.xml", "empty", None))
    assert e.value.reason == "not_ecg"


def test_too_large_is_refused_before_decoding(tmp_path):
    with pytest.raises(RejectedRecord) as e:
        list(read_muse(MUSE[0], "x", ReadOptions(max_samples=1000)))
    assert e.value.reason == "too_large"
    with pytest.raises(RejectedRecord) as e:
        list(read_hl7_aecg(HL7_12[0], "x", ReadOptions(max_samples=1000)))
    assert e.value.reason == "too_large"
    with pytest.raises(RejectedRecord) as e:
        list(read_philips(PHILIPS[0], "x", ReadOptions(max_samples=1000)))
    assert e.value.reason == "too_large"


_BOMB = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>
<RestingECG><PatientDemographics><PatientID>&lol9;</PatientID></PatientDemographics></RestingECG>"""


@pytest.mark.parametrize("name,text", [
    ("bomb", _BOMB),
    ("xxe", '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            '<restingecgdata><documentinfo>&x;</documentinfo></restingecgdata>'),
    ("dtd_fetch", '<?xml version="1.0"?><!DOCTYPE AnnotatedECG SYSTEM "http://127.0.0.1:9/evil.dtd">'
                  '<AnnotatedECG/>'),
    ("truncated", MUSE[0].read_text("latin-1")[:60000]),
    ("not_xml", "\x00\x01 binary junk <<<"),
])
def test_hostile_and_broken_xml_is_a_reject(tmp_path, name, text):
    path = tmp_path / f"{name}.xml"
    path.write_text(text, "latin-1")
    t0 = time.perf_counter()
    for reader in READERS.values():
        with pytest.raises(RejectedRecord) as e:
            list(reader(path, name, None))
        assert e.value.reason in ("unreadable", "not_ecg"), e.value
        if name == "xxe":
            assert "root:" not in e.value.detail
    assert time.perf_counter() - t0 < 2


_FUZZ_SOURCES = [(read_muse, MUSE[0]), (read_philips, PHILIPS[0]), (read_hl7_aecg, HL7_12[0])]
_FUZZ_BYTES = [p.read_bytes() for _, p in _FUZZ_SOURCES]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, len(_FUZZ_SOURCES) - 1), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=6),
       insert=st.binary(max_size=40))
def test_fuzzed_files_read_or_reject_never_crash(tmp_path, which, cut, flips, insert):
    """Truncations, byte flips and inserted junk of real files: every outcome is records or one RejectedRecord
    with a known reason, quickly (no hang, no traceback)."""
    reader, src = _FUZZ_SOURCES[which]
    data = bytearray(_FUZZ_BYTES[which])
    for pos, value in flips:
        data[int(pos * (len(data) - 1))] = value
    k = int(cut * len(data))
    data = data[:k] + insert + data[k:] if insert else data[: max(k, 1)]
    path = tmp_path / ("f" + src.suffix)
    path.write_bytes(bytes(data))
    t0 = time.perf_counter()
    try:
        for rec in reader(path, "f", ReadOptions()):
            assert np.isfinite(rec.signal).all() and rec.signal.ndim == 2
    except RejectedRecord as e:
        assert e.reason in ("unreadable", "not_ecg", "size_mismatch", "empty", "bad_sample_rate", "too_large",
                            "duplicate_lead"), e
    assert time.perf_counter() - t0 < 5
