"""``ecgfm embed --features rhythm``: classical rhythm features (ecgfm_cli/features.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import run_main as ecgfm
from conftest import segment_sample

from ecgfm_cli.features import (
    FEATURES,
    FILL,
    FeaturesError,
    choose_lead,
    embedding_names,
    features_of_batch,
    finish_features,
    interval_ms,
    lead_order,
    pool_records,
    require_neurokit,
    rr_features,
    segment_features,
)

FS = 500.0


def test_rr_features_regular_and_irregular():
    regular = rr_features(np.arange(0, 2500, 500), FS)  # a beat each second
    assert regular["heart_rate_bpm"] == pytest.approx(60.0)
    assert regular["rr_cv"] == pytest.approx(0.0)
    assert regular["rmssd_rel"] == pytest.approx(0.0)
    assert regular["pnn50"] == 0.0
    rr = np.array([0.8, 1.0, 0.9, 1.2])  # s
    peaks = np.concatenate([[0], np.cumsum(rr) * FS])
    f = rr_features(peaks, FS)
    assert f["heart_rate_bpm"] == pytest.approx(60 / rr.mean())
    assert f["rr_cv"] == pytest.approx(rr.std() / rr.mean())
    d = np.diff(rr)
    assert f["rmssd_rel"] == pytest.approx(np.sqrt(np.mean(d**2)) / rr.mean())
    assert f["pnn50"] == pytest.approx(1.0)  # every successive difference > 50 ms
    # two beats: one interval, too few for any of them
    assert all(np.isnan(v) for v in rr_features(np.array([0, 400]), FS).values())
    three = rr_features(np.array([0, 400, 800]), FS)
    assert three["heart_rate_bpm"] == pytest.approx(75.0) and np.isnan(three["rmssd_rel"])


def test_interval_ms_median_within_plausible_range():
    onset = [100, 600, 1100, np.nan]
    offset = [150, 650, 1300, 1700]  # 100 ms, 100 ms, 400 ms (not a QRS: dropped), NaN
    assert interval_ms(onset, offset, FS, "qrs_ms") == pytest.approx(100.0)
    assert np.isnan(interval_ms([], [], FS, "qrs_ms"))
    assert np.isnan(interval_ms([0], [1000], FS, "qrs_ms"))


def test_finish_features_fills_and_flags():
    raw = np.array([[70.0, 0.1, 0.1, 0.2, 90.0, 150.0, 380.0],
                    [np.nan] * 7])
    out = finish_features(raw)
    assert out.dtype == np.float32 and out.shape == (2, 14)
    np.testing.assert_allclose(out[0, :7], raw[0], rtol=1e-6)
    assert (out[0, 7:] == 0).all()
    np.testing.assert_allclose(out[1, :7], [FILL[n] for n in FEATURES])
    assert (out[1, 7:] == 1).all()
    assert embedding_names()[7] == "heart_rate_bpm_missing" and len(embedding_names()) == 14


def test_pool_records_nanmean_and_contiguity():
    feats = np.array([[60.0, np.nan], [80.0, np.nan], [np.nan, 5.0], [70.0, 1.0]])
    ids, pooled, starts = pool_records(["a", "a", "b", "b"], feats)
    assert ids == ["a", "b"] and starts == [0, 2]
    np.testing.assert_allclose(pooled[0], [70.0, np.nan])
    np.testing.assert_allclose(pooled[1], [70.0, 3.0])
    with pytest.raises(FeaturesError, match="not contiguous"):
        pool_records(["a", "b", "a"], feats[:3])


def test_lead_choice_falls_back_when_lead_ii_is_absent():
    leads = ["I", "II", "III"]
    order = lead_order(leads)
    assert order[:2] == [1, 0]  # II first, then I
    assert lead_order(leads, ["III", "I"]) == [2, 0]
    x = np.random.default_rng(0).normal(size=(3, 100))
    assert choose_lead(x, np.array([True, True, True]), order) == 1
    assert choose_lead(x, np.array([True, False, True]), order) == 0
    flat = x.copy()
    flat[1] = 0.0
    assert choose_lead(flat, np.ones(3, bool), order) == 0
    nan = x.copy()
    nan[1, 5] = np.nan
    assert choose_lead(nan, np.ones(3, bool), order) == 0
    assert choose_lead(x, np.zeros(3, bool), order) is None


def _synthetic_ecg(hr: float, seed: int = 0) -> np.ndarray:
    nk = pytest.importorskip("neurokit2")
    return np.asarray(nk.ecg_simulate(duration=5, sampling_rate=int(FS), heart_rate=hr, random_state=seed,
                                      noise=0.01))


def test_segment_features_on_a_simulated_ecg():
    x = _synthetic_ecg(72)
    f = dict(zip(FEATURES, segment_features((x - x.mean()) / x.std(), FS), strict=True))
    assert f["heart_rate_bpm"] == pytest.approx(72, abs=4)
    assert f["rr_cv"] < 0.05
    assert 40 <= f["qrs_ms"] <= 250 and 200 <= f["qt_ms"] <= 700
    flat = segment_features(np.zeros(2500), FS)
    assert np.isnan(flat).all()


def test_features_of_batch_marks_segments_without_a_usable_lead():
    x = np.zeros((2, 2, 2500), np.float32)
    x[0, 1] = _synthetic_ecg(60)
    feats, used = features_of_batch((x, np.array([[True, True], [True, True]]), [1, 0], FS))
    assert used.tolist() == [1, -1]
    assert np.isfinite(feats[0, 0]) and np.isnan(feats[1]).all()


def test_missing_neurokit_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "neurokit2", None)  # import raises ImportError
    with pytest.raises(FeaturesError, match=r"pip install 'ecgfm-cli\[features\]'"):
        require_neurokit()


@pytest.fixture(scope="module")
def segments(sample_data, tmp_path_factory) -> Path:
    return segment_sample(sample_data / "challenge2021", tmp_path_factory.mktemp("features"), segments="seg.parquet")


def test_embed_features_cli_writes_an_embeddings_artifact_probe_reads(segments, tmp_path, capsys):
    pytest.importorskip("neurokit2")
    from ecgfm_cli.probe import load_embeddings

    out = tmp_path / "feats.parquet"
    code, err = ecgfm(capsys, "embed", segments, "--features", "rhythm", "-o", out)
    assert code == 0, err
    assert "rhythm features" in err and "lead used: II" in err
    table = pq.read_table(out)
    n_seg = pq.read_metadata(segments).num_rows
    assert table.num_rows == n_seg
    assert table.schema.field("embedding").type.list_size == 14
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["ecgfm.kind"] == "embeddings"
    model = json.loads(meta["ecgfm.model"])
    assert model["kind"] == "features" and model["columns"] == embedding_names()
    assert json.loads(meta["ecgfm.provenance"])["settings"]["features"] == "rhythm"
    emb = load_embeddings(out)
    assert emb.X.shape == (n_seg, 14) and np.isfinite(emb.X).all()

    pooled = tmp_path / "rec.npz"
    code, err = ecgfm(capsys, "embed", segments, "--features", "rhythm", "--pool", "record", "-o", pooled)
    assert code == 0, err
    emb_r = load_embeddings(pooled)
    assert (emb_r.segment_index == -1).all() and len(set(emb_r.record_ids)) == len(emb_r.record_ids)
    # a record's pooled heart rate is the mean of its segments' (all defined here)
    rid = emb.record_ids[0]
    seg_hr = emb.X[emb.record_ids == rid, 0]
    if (emb.X[emb.record_ids == rid, 7] == 0).all():
        assert emb_r.X[list(emb_r.record_ids).index(rid), 0] == pytest.approx(seg_hr.mean(), rel=1e-5)


def test_embed_features_option_errors(segments, tmp_path, capsys):
    pytest.importorskip("neurokit2")
    code, err = ecgfm(capsys, "embed", segments, "--features", "morphology", "-o", tmp_path / "f.parquet")
    assert code == 2 and "--features" in err and "rhythm" in err
    code, err = ecgfm(capsys, "embed", segments, "--features", "rhythm", "--random-init", "-o", tmp_path / "f.parquet")
    assert code == 2 and "without a model" in err
    code, err = ecgfm(capsys, "embed", segments, "--features", "rhythm", "--leads", "X9", "-o", tmp_path / "f.parquet")
    assert code == 2 and "'X9'" in err
