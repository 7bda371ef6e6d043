"""De-identification: statement scrubbing, pseudonyms, ages, and no identifier in any output of ingest | segment."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ecgfm_cli.deid import (
    Deidentifier,
    DeidPolicy,
    age_from_dates,
    cap_age,
    pseudonym,
    read_id_key,
    scrub_statement,
    scrub_statements,
)
from ecgfm_cli.io.record import RawRecord
from tests.conftest import run_main

HOSP = Path(__file__).resolve().parents[1] / "sample_data" / "hospital_formats"


@pytest.mark.parametrize("text,want", [
    ("Confirmed by Doe, John (123456) on 05/10/2021 1:15:09 PM", None),
    ("Referred by: Jones", None),
    ("Technician: KAB", None),
    ("Reviewed by A. Smith MD", None),
    ("Electronically signed by Jane Roe on 2020-01-01", None),
    ("Physician: Dr. Who", None),
    ("When compared with ECG of 10-MAY-2021 14:14,", "When compared with ECG of [date]"),
    ("Abnormal ECG; compared to 2019-03-04", "Abnormal ECG; compared to [date]"),
    ("No change since May 3, 2019", "No change since [date]"),
    ("Compared with tracing read by Dr. A. Smith, no change", "Compared with tracing read [person], no change"),
    ("Sinus rhythm, seen by Clark", "Sinus rhythm, seen by [person]"),
    ("Accession 03028041970546", "Accession [id]"),
    # findings and measurements stay as they are
    ("Q > 40 ms i V2", "Q > 40 ms i V2"),
    ("SINUS RHYTHM; normal P axis, V-rate 60-99", "SINUS RHYTHM; normal P axis, V-rate 60-99"),
    ("QRSd >115mS, not LBBB/RBBB", "QRSd >115mS, not LBBB/RBBB"),
    ("Lateral infarct, age undetermined", "Lateral infarct, age undetermined"),
    ("ST >0.20 mV in V1-V4 & LVH", "ST >0.20 mV in V1-V4 & LVH"),
    ("Unconfirmed diagnosis", "Unconfirmed diagnosis"),
])
def test_scrub_statement(text, want):
    assert scrub_statement(text, known=["Clark"]) == want


def test_scrub_statements_reports_what_it_removed():
    kept, removed = scrub_statements(["Sinus rhythm", "Confirmed by X Y", "ECG of 01/02/2020"])
    assert kept == ["Sinus rhythm", "ECG of [date]"]
    assert removed == ["Confirmed by X Y", "ECG of 01/02/2020"]


def test_pseudonym_is_keyed_and_stable():
    a, b = b"k" * 32, b"j" * 32
    assert pseudonym("JAX01234", a) == pseudonym(" JAX01234 ", a)  # stable (and across runs: a pure function)
    assert pseudonym("JAX01234", a) != pseudonym("JAX01234", b) != pseudonym("JAX12345", b)
    assert pseudonym("JAX01234", a) == "pid-" + __import__("hmac").new(a, b"JAX01234", "sha256").hexdigest()[:20]


def test_key_file_needs_16_bytes(tmp_path):
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ValueError, match="at least 16"):
        read_id_key(tmp_path / "short")
    (tmp_path / "ok").write_text("x" * 40 + "\n")
    assert read_id_key(tmp_path / "ok") == b"x" * 40


def test_ages():
    assert age_from_dates("1950-01-01", "2010-01-19T15:19:22") == 60
    assert age_from_dates("1950-01-20", "2010-01-19") == 59  # birthday not yet reached
    assert age_from_dates("2011-01-01", "2010-01-19") is None and age_from_dates("", "2010") is None
    assert cap_age(89.0) == 89 and cap_age(89.5) == 90 and cap_age(104) == 90 and cap_age(None) is None


def _hospital(**kw) -> RawRecord:
    base = dict(record_id="exports/DOE_JOHN_12345", source_path="/data/exports/DOE_JOHN_12345.xml",
                source_format="ge-muse-xml", sample_rate=500.0, leads=["I"], signal=np.zeros((1, 10), np.float32),
                base_datetime="2021-05-10T13:15:18",
                identifiers={"mrn": "12345", "name": "John Doe", "birth_date": "1920-02-03", "persons": "Ann Lee",
                             "other": "Confirmed by Ann Lee"})
    base.update(kw)
    return RawRecord(**base)


def test_deidentify_defaults_and_key():
    deid = Deidentifier(DeidPolicy(key=b"s" * 32))
    out = deid(_hospital())
    assert out.patient_id == pseudonym("12345", b"s" * 32)
    assert out.age == 90  # 101 from the birth date, capped
    assert out.base_datetime == "2021" and out.identifiers == {}
    assert out.record_id == "exports/REDACTED_REDACTED_REDACTED" and "DOE" not in out.source_path
    assert deid.messages() and "REDACTED" in deid.messages()[0]
    no_key = Deidentifier(DeidPolicy())
    assert no_key(_hospital()).patient_id is None
    assert any("--id-key" in m for m in no_key.messages())


def test_keep_identifiers_keeps_them_and_says_so():
    deid = Deidentifier(DeidPolicy(keep_identifiers=True))
    out = deid(_hospital())
    assert out.patient_id == "12345" and out.comments["identifier_name"] == "John Doe"
    assert out.base_datetime == "2021-05-10T13:15:18" and out.record_id == "exports/DOE_JOHN_12345"
    assert any("WARNING --keep-identifiers" in m for m in deid.messages())


def test_research_records_are_left_alone():
    rec = RawRecord(record_id="p1/s2/3", source_path="x.hea", source_format="wfdb", sample_rate=500.0, leads=["I"],
                    signal=np.zeros((1, 10), np.float32), patient_id="10001", age=95.0,
                    base_datetime="2180-01-01T00:00:00")
    assert Deidentifier(DeidPolicy())(rec) is rec


# ------------------------------------------------------------------ no identifier in any output, per file

def _dicom_strings(path: Path) -> list[str]:
    """Identifying strings of a DICOM file, read independently of our reader (pydicom)."""
    pydicom = pytest.importorskip("pydicom")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    out = [str(ds.get(k, "")) for k in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
                                         "InstitutionName", "AdmissionID", "OtherPatientIDs")]
    bd = str(ds.get("PatientBirthDate", ""))
    if len(bd) == 8:
        out.append(f"{bd[:4]}-{bd[4:6]}-{bd[6:]}")
    return [s for s in out if len(s) >= 4]


#: per sample file: the identifying strings it holds (names, MRN, birth date, staff, ids, sites), as written
IDENTIFYING = {
    "ge_muse/muse_ecg1.xml": ["JAX01234", "TEST 05", "Doe", "John", "123456", "10173", "LAST", "FIRST",
                              "SCD06526477PA", "FL Research Location", "05-10-2021", "05/10/2021", "10-MAY-2021"],
    "philips_sierra/129DYPRG.XML": ["1112010721168bdc", "GEILM", "03d494f2-94f2-13d4-857f-00095c028bdc"],
    "philips_sierra/3191723_ZZDEMOPTONLY_1-04_orig.xml": [
        "ZZDEMOPTONLY", "ADULT", "1950-01-01", "9999", "120190145", "VWJ", "Heart Station", "TEST PT",
        "7eacbc80-0549-11df-4823-000738300029", "Storage Card", "2010-01-19"],
    "hl7_aecg/subject1_0.xml": ["subject1", "Clark", "19530508", "1953-05-08", "JMK", "John Smith", "KAB",
                                "John Brown", "SC-342", "INV-087", "TECH-221", "TS-035", "River City",
                                "felt dizzy"],
    "hl7_aecg/minimum_aecg.xml": ["SBJ-123"],
    # in ../shared only (same writers as the committed ones)
    "ge_muse/muse_ecg2.xml": ["JAX12345", "TEST 04", "10173", "LAST", "FIRST", "SCD06526477PA",
                              "FL Research Location", "05-10-2021"],
    "philips_sierra/repbeats_example.xml": ["1112010721168bdc", "GEILM"],
    "hl7_aecg/Example aECG.xml": ["SBJ-123", "Clark", "1953-05-08", "JMK", "John Smith", "KAB", "John Brown",
                                  "SC-342", "INV-087", "TECH-221", "TS-035", "River City", "felt dizzy"],
    "hl7_aecg/empty.xml": [],
    "scp_ecg/ECG_20060620_112352_FINAL001.SCP": ["FINAL001", "Forsberg", "1970-01-13", "20060620"],
    "scp_ecg/ECG_20070321_110542_191010101010.SCP": ["191010101010", "Karlsson", "1968-02-27", "20070321"],
    "dicom/anonymous_ecg.dcm": None,  # read from the file with pydicom
}


def _texts(table: pa.Table) -> list[str]:
    """Every text a table carries: string cells (JSON included), list items, column names, metadata. The signal
    columns are numbers only and are left out."""
    out = [*table.column_names, json.dumps({str(k): str(v) for k, v in (table.schema.metadata or {}).items()})]
    for name in table.column_names:
        col = table.column(name)
        if _textual(col.type):
            out.extend(str(v) for v in col.to_pylist())
    return out


def _textual(t: pa.DataType) -> bool:
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _textual(t.value_type)
    if pa.types.is_struct(t):
        return any(_textual(t.field(i).type) for i in range(t.num_fields))
    return False


def _all_output_text(*dirs: Path) -> str:
    parts = []
    for d in dirs:
        for f in sorted(d.rglob("*")):
            if f.suffix == ".parquet":
                parts.extend(_texts(pq.read_table(f)))
            elif f.is_file():
                parts.append(f.read_text(errors="replace"))
    return "\n".join(parts)


@pytest.mark.parametrize("rel", sorted(IDENTIFYING))
def test_no_identifier_reaches_any_output(rel, tmp_path, capsys):
    src = HOSP / rel
    if not src.is_file():  # the reject-only samples stay in ../shared
        src = HOSP.parents[2] / "shared" / "data" / "hospital_formats" / rel
        if not src.is_file():
            pytest.skip(f"{rel} is neither in sample_data nor in ../shared")
    strings = IDENTIFYING[rel] if IDENTIFYING[rel] is not None else _dicom_strings(src)
    raw = src.read_bytes()
    for s in strings:  # the list is honest: each string is in the file (or in its name)
        assert _in_file(s, raw, rel, src), s
    folder = tmp_path / "in" / Path(rel).parent.name
    folder.mkdir(parents=True)
    shutil.copy(src, folder / src.name)
    (tmp_path / "key").write_text("a-secret-of-more-than-16-bytes\n")
    code, err_ingest = run_main(capsys, "ingest", tmp_path / "in", "-o", tmp_path / "rec", "--id-key",
                                tmp_path / "key")
    outputs = [tmp_path / "rec"]
    err_segment = ""
    if code == 0:
        code2, err_segment = run_main(capsys, "segment", tmp_path / "rec", "-o", tmp_path / "seg")
        outputs.append(tmp_path / "seg")
    elif rel != "hl7_aecg/empty.xml":
        pytest.fail(f"ingest failed on {rel}: {err_ingest}")
    text = "\n".join([_all_output_text(*[o for o in outputs if o.exists()]), err_ingest, err_segment])
    leaked = [s for s in strings if s in text]
    assert not leaked, f"{rel}: {leaked} in the outputs"


def _in_file(s: str, raw: bytes, rel: str, src: Path) -> bool:
    if s.encode() in raw or s.encode("utf-16-le") in raw or s in rel or s in _dicom_text(src):
        return True
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", s):  # a date: as digits, or SCP-ECG's binary (uint16 year, month, day)
        y, m, d = map(int, s.split("-"))
        return s.replace("-", "").encode() in raw or struct.pack("<HBB", y, m, d) in raw
    return False


def _dicom_text(path: Path) -> str:
    if path.suffix != ".dcm":
        return ""
    return " ".join(_dicom_strings(path))


def test_keep_identifiers_cli_writes_them_loudly(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(HOSP / "ge_muse" / "muse_ecg1.xml", folder)
    code, err = run_main(capsys, "ingest", folder, "-o", tmp_path / "rec", "--keep-identifiers")
    assert code == 0 and "WARNING --keep-identifiers" in err
    table = pq.read_table(next((tmp_path / "rec").glob("records-*.parquet")))
    assert table.column("patient_id").to_pylist() == ["JAX01234"]
    assert "TEST 05" in table.column("comments").to_pylist()[0]


def test_no_key_warns_once_and_leaves_patient_id_empty(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(HOSP / "ge_muse" / "muse_ecg1.xml", folder)
    shutil.copy(HOSP / "philips_sierra" / "129DYPRG.XML", folder)
    code, err = run_main(capsys, "ingest", folder, "-o", tmp_path / "rec")
    assert code == 0 and err.count("no --id-key") == 1
    table = pq.read_table(next((tmp_path / "rec").glob("records-*.parquet")))
    assert table.column("patient_id").to_pylist() == [None, None]
    labels = pq.read_table(next((tmp_path / "rec").glob("labels-*.parquet")))
    qrs = dict(zip(labels.column("record_id").to_pylist(), labels.column("qrs_duration_ms").to_pylist(), strict=True))
    assert qrs == {"muse_ecg1": 78.0, "129DYPRG": 135.0}  # measurements as label columns
