"""ECG-FM preprocessing: pure functions, and parity with ECG-FM's own outputs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io as sio
from scipy.interpolate import interp1d

from ecgfm_cli.contract import STANDARD_LEADS, canonical_lead
from ecgfm_cli.preprocess import (
    PreprocessError,
    SegmentOptions,
    reorder_leads,
    resample_linear,
    segment_record,
    window_starts,
    zscore,
)


def reference_pipeline(x: np.ndarray, fs: float) -> np.ndarray:
    """ECG-FM's steps written the way fairseq-signals writes them (scipy interp1d, then z-score)."""
    n = x.shape[1]
    n_new = int(n * 500 / fs)
    y = interp1d(np.linspace(0, n_new - 1, n), x.astype(np.float64))(np.arange(n_new))
    mean, std = y.mean(axis=1, keepdims=True), y.std(axis=1, keepdims=True)
    return (y - mean) / std


@pytest.mark.parametrize("fs", [100, 200, 257, 360, 400, 500, 1000])
def test_resample_matches_interp1d(fs):
    rng = np.random.default_rng(fs)
    x = rng.standard_normal((3, 1234))
    n_new = int(1234 * 500 / fs)
    ref = interp1d(np.linspace(0, n_new - 1, 1234), x)(np.arange(n_new))
    out = resample_linear(x, fs, 500)
    assert out.shape == (3, n_new)
    np.testing.assert_allclose(out, ref, atol=1e-9)
    assert out[:, 0] == pytest.approx(x[:, 0]) and out[:, -1] == pytest.approx(x[:, -1])


def test_zscore_constant_lead_becomes_zero():
    x = np.vstack([np.arange(10.0), np.full(10, 3.0)])
    z = zscore(x)
    assert np.allclose(z[1], 0)
    assert z[0].mean() == pytest.approx(0, abs=1e-6) and z[0].std() == pytest.approx(1, abs=1e-6)
    # float32 flat leads away from 0: their rounded mean leaves a std of ~1e-8, which must not scale them to +-1
    flat = np.vstack([np.full(5000, v, np.float32) for v in (0.1, 0.3, -1.7)] + [np.ones(5000, np.float32)])
    assert not zscore(flat).any()
    # in a record: a flat lead is a lead without signal, zero and flagged absent; all flat is no record at all
    x = np.random.default_rng(0).standard_normal((12, 5000)).astype(np.float32)
    x[[2, 7]] = flat[[0, 3]]
    seg = segment_record(x, STANDARD_LEADS, 500.0, SegmentOptions())
    assert seg.flat_leads == ["III", "V2"] and not seg.present[[2, 7]].any() and seg.present.sum() == 10
    assert not seg.windows[:, [2, 7]].any() and seg.windows[:, 0].std() > 0.5
    with pytest.raises(PreprocessError) as e:
        segment_record(flat[[0, 1, 2, 3] * 3], STANDARD_LEADS, 500.0, SegmentOptions())
    assert e.value.reason == "no_signal"


def test_reorder_by_name_case_insensitive_and_missing_zero_filled():
    leads = ["V6", "AVR", "I", "avf", "aVL", "ECG"]
    x = np.arange(6, dtype=float)[:, None] * np.ones((6, 4))
    out, present = reorder_leads(x, leads, STANDARD_LEADS)
    assert present.tolist() == [True, False, False, True, True, True] + [False] * 5 + [True]
    assert out[STANDARD_LEADS.index("aVR"), 0] == 1 and out[STANDARD_LEADS.index("V6"), 0] == 0
    assert out[STANDARD_LEADS.index("aVF"), 0] == 3 and not out[1].any()


def test_inverted_avr_is_negated_back():
    """-aVR (Cabrera display) holds the negative of aVR: it enters the model as aVR with its sign restored."""
    x = np.vstack([np.linspace(-1, 1, 8), np.linspace(0, 2, 8)])
    out, present = reorder_leads(x, ["I", "-aVR"], STANDARD_LEADS)
    assert present[3] and np.array_equal(out[3], -x[1]) and np.array_equal(out[0], x[0])
    out, _ = reorder_leads(x, ["I", "-aVR"], STANDARD_LEADS, {"-aVR": "aVR"})  # named by the user: taken as is
    assert np.array_equal(out[3], x[1])


def test_lead_map_names_an_unnamed_lead_and_unknown_leads_are_rejected():
    x = np.ones((1, 5000))
    with pytest.raises(PreprocessError) as e:
        reorder_leads(x, ["ECG"], STANDARD_LEADS)
    assert e.value.reason == "unknown_lead" and "--lead-map" in e.value.detail
    out, present = reorder_leads(x, ["ECG"], STANDARD_LEADS, {"ecg": "II"})
    assert present.tolist() == [False, True] + [False] * 10
    assert canonical_lead("MLII") == "II" and canonical_lead("foo") is None


def test_duplicate_leads_rejected():
    with pytest.raises(PreprocessError) as e:
        reorder_leads(np.ones((2, 10)), ["I", "LEAD I"], STANDARD_LEADS)
    assert e.value.reason == "duplicate_lead"


def test_windows_non_overlapping_remainder_dropped_and_stride():
    assert window_starts(5120, 2500, 2500).tolist() == [0, 2500]
    assert window_starts(2499, 2500, 2500).tolist() == []
    assert window_starts(5000, 2500, 1250).tolist() == [0, 1250, 2500]


def test_segment_record_end_to_end_against_reference_steps():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 4096)).astype(np.float32)
    seg = segment_record(x, STANDARD_LEADS, 400, SegmentOptions())
    ref = reference_pipeline(x, 400)
    assert seg.windows.shape == (2, 12, 2500) and seg.windows.dtype == np.float32
    np.testing.assert_allclose(seg.windows[1], ref[:, 2500:5000], atol=1e-5)
    # windows are not re-normalised: each is a plain slice of the record-level z-score
    assert abs(seg.windows[0].mean(axis=1)).max() > 1e-4


def test_nan_lead_zeroed_and_flagged_or_dropped():
    x = np.random.default_rng(1).standard_normal((12, 5000))
    x[3, 100] = np.nan
    seg = segment_record(x, STANDARD_LEADS, 500, SegmentOptions())
    assert not seg.present[3] and seg.present.sum() == 11 and not seg.windows[:, 3].any()
    assert seg.nan_leads == ["aVR"]
    with pytest.raises(PreprocessError) as e:
        segment_record(x, STANDARD_LEADS, 500, SegmentOptions(nan="drop"))
    assert e.value.reason == "nan_lead"
    # an infinite sample is as unusable as a missing one (it made the whole lead NaN, flagged present)
    x[3, 100], x[7, 5], x[8, 9] = 0.0, np.inf, -np.inf
    seg = segment_record(x, STANDARD_LEADS, 500, SegmentOptions())
    assert seg.nan_leads == ["V2", "V3"] and np.isfinite(seg.windows).all() and seg.present.sum() == 10


def test_short_record_rejected_or_padded():
    x = np.random.default_rng(2).standard_normal((12, 2000))
    with pytest.raises(PreprocessError) as e:
        segment_record(x, STANDARD_LEADS, 500, SegmentOptions())
    assert e.value.reason == "too_short"
    seg = segment_record(x, STANDARD_LEADS, 500, SegmentOptions(pad=True))
    assert seg.padded and seg.windows.shape == (1, 12, 2500) and not seg.windows[0, :, 2000:].any()


def _parity(org_dir, seg_dir):
    worst, count = 0.0, 0
    for f in sorted(org_dir.glob("*.mat")):
        m = sio.loadmat(f)
        seg = segment_record(m["feats"], STANDARD_LEADS, float(m["curr_sample_rate"].squeeze()), SegmentOptions())
        refs = sorted(seg_dir.glob(f"{f.stem}_*.mat"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        assert len(refs) == len(seg.windows), f.name
        for i, r in enumerate(refs):
            worst = max(worst, float(np.abs(sio.loadmat(r)["feats"] - seg.windows[i]).max()))
            count += 1
    return worst, count


def test_parity_with_ecgfm_on_committed_record(sample_data):
    worst, count = _parity(sample_data / "ecgfm_reference" / "org", sample_data / "ecgfm_reference" / "segmented")
    assert count == 2 and worst <= 1e-4


def test_parity_with_ecgfm_on_all_reference_records(shared_data):
    ref = shared_data / "ecgfm_code15_reference"
    worst, count = _parity(ref / "org", ref / "segmented")
    assert count == 14 and worst <= 1e-4
