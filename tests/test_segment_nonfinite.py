"""`segment` and non-finite or absurdly large samples (issue #16.9, segment side): an inf is handled as a NaN is
(the --nan policy, for that lead only); amplitudes near float32's limit (a gain off by 30 orders of magnitude)
give the same windows as the true-scale record, not NaN; a record that loses every lead to a few non-finite
samples says so."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from ecgfm_cli.cli import app
from ecgfm_cli.preprocess import PreprocessError, SegmentOptions, segment_record

LEADS = list(SegmentOptions().leads)


@dataclass
class _Result:
    returncode: int
    stderr: str


def _run(*args) -> _Result:
    """The CLI in-process (a subprocess per call would cost a second of start-up each)."""
    res = CliRunner().invoke(app, [str(a) for a in args])
    return _Result(res.exit_code, res.output + ("" if res.exception is None else str(res.exception)))


def _records(sample_data: Path, tmp_path: Path) -> Path:
    """One CODE-15 sample record ingested to a records file."""
    src = tmp_path / "src"
    src.mkdir()
    for ext in ("hea", "dat"):
        shutil.copy(sample_data / "code15_wfdb" / f"1111.{ext}", src)
    out = tmp_path / "src.parquet"
    res = _run("ingest", src, "-o", out)
    assert res.returncode == 0, res.stderr
    return out


def _with_signal(records: Path, edit) -> Path:
    t = pq.read_table(records)
    row = t.slice(0, 1).to_pylist()[0]
    sig = np.array(row["signal"], dtype=np.float32).reshape(row["n_leads"], row["n_samples"])
    edit(sig)
    col = pa.array([sig.ravel().tolist()], t.schema.field("signal").type)
    t = t.set_column(t.schema.get_field_index("signal"), t.schema.field("signal"), col)
    out = records.with_name(records.stem + "_edited.parquet")
    pq.write_table(t, out)
    return out


def _windows(seg: Path) -> tuple[np.ndarray, np.ndarray]:
    t = pq.read_table(seg)
    n = t.num_rows
    sig = np.asarray(t.column("signal").combine_chunks().flatten().to_numpy(zero_copy_only=False)).reshape(n, 12, -1)
    present = np.asarray(t.column("lead_present").combine_chunks().flatten().to_numpy(zero_copy_only=False))
    return sig, present.reshape(n, 12)


def test_one_inf_sample_is_that_leads_nan_policy(sample_data, tmp_path):
    rec = _records(sample_data, tmp_path)
    bad = _with_signal(rec, lambda s: s.__setitem__((3, 500), np.inf))  # stored lead 3 is AVR
    res = _run("segment", bad, "-o", tmp_path / "seg.parquet")
    assert res.returncode == 0, res.stderr
    assert "NaN/inf leads zeroed" in res.stderr
    sig, present = _windows(tmp_path / "seg.parquet")
    assert np.isfinite(sig).all()
    assert present[:, LEADS.index("aVR")].tolist() == [False] * len(present) and present.sum() == 11 * len(present)
    good, _ = _windows(_segment(rec, tmp_path / "good.parquet"))
    keep = [i for i in range(12) if i != LEADS.index("aVR")]
    np.testing.assert_array_equal(sig[:, keep], good[:, keep])  # the other leads are untouched
    res = _run("segment", bad, "-o", tmp_path / "drop.parquet", "--nan", "drop")
    assert res.returncode != 0 and "nan_lead" in res.stderr


def _segment(records: Path, out: Path) -> Path:
    res = _run("segment", records, "-o", out)
    assert res.returncode == 0, res.stderr
    return out


def test_huge_amplitudes_give_the_true_scale_windows(sample_data, tmp_path):
    """Samples x 1e36 (a records file whose gain was off by 36 orders of magnitude; ingest itself now rejects
    such a header as implausible_amplitude): finite, but the float32 z-score overflowed to NaN windows."""
    rec = _records(sample_data, tmp_path)
    good, _ = _windows(_segment(rec, tmp_path / "good.parquet"))

    def scale(s: np.ndarray) -> None:
        s *= np.float32(1e36)

    huge_rec = _with_signal(rec, scale)
    sig = np.array(pq.read_table(huge_rec).column("signal")[0].as_py(), dtype=np.float32)
    assert np.isfinite(sig).all() and np.abs(sig).max() > 1e36
    huge, present = _windows(_segment(huge_rec, tmp_path / "huge.parquet"))
    assert np.isfinite(huge).all() and present.all()
    np.testing.assert_allclose(huge, good, atol=2e-5)


def test_every_lead_losing_a_few_samples_to_inf_says_so():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 5000)).astype(np.float32)
    x[:, 1234] = np.inf  # 0.02 % of the record
    try:
        segment_record(x, LEADS, 500, SegmentOptions())
    except PreprocessError as e:
        assert e.reason == "nan_lead" and "infinite" in e.detail and "of 5000" in e.detail and "flat" not in e.detail
    else:
        raise AssertionError("expected a reject")
