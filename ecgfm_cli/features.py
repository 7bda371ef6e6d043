"""``ecgfm embed --features rhythm``: classical rhythm/interval features per segment, as an embeddings artifact.

The baseline a foundation-model result should be read against: heart rate, R-R irregularity and the QRS/PR/QT
intervals of one lead, from neurokit2's R-peak detector (``ecg_peaks``) and its wavelet delineator
(``ecg_delineate(method="dwt")``), not a hand-written detector. The output has the columns of ``ecgfm embed``'s
(record_id, patient_id, segment_index, embedding float32 [D]) so ``probe --baseline`` and ``evaluate`` take it.

Layers: :func:`segment_features` (one 1-D signal -> raw features, NaN where undefined), :func:`choose_lead`,
:func:`features_of_batch` (a (B, C, L) batch -> (B, F) raw features, picklable for worker processes),
:func:`finish_features` (NaN -> fixed fill + missing-indicator columns), :func:`run_features` (artifact in -> out).

Shapes: B segments, C leads, L samples per segment (2500 = 5 s at 500 Hz), F raw features (7), D = 2 F.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ecgfm_cli.errors import EcgfmError

#: Raw feature names, in embedding order (then one ``<name>_missing`` 0/1 column each).
FEATURES: tuple[str, ...] = ("heart_rate_bpm", "rr_cv", "rmssd_rel", "pnn50", "qrs_ms", "pr_ms", "qt_ms")

#: The value a feature takes where it is undefined (beside its ``_missing`` indicator = 1): typical resting adult
#: sinus-rhythm values. Fixed, not the cohort median, so a segment's features never depend on the other segments of
#: the input (embedding the test set alone gives the same rows) and nothing leaks across splits; with the indicator
#: in the same linear model the fill only shifts that indicator's coefficient.
FILL: dict[str, float] = {"heart_rate_bpm": 75.0, "rr_cv": 0.04, "rmssd_rel": 0.04, "pnn50": 0.05,
                          "qrs_ms": 100.0, "pr_ms": 160.0, "qt_ms": 400.0}

#: Leads tried in this order when the preferred one is absent, flat or not finite in a segment.
LEAD_PREFERENCE: tuple[str, ...] = ("II", "I", "V5", "V6", "V4", "aVF", "III", "V2", "V3", "V1", "aVL", "aVR")

#: Plausible ranges (ms) of a delineated interval: values outside are delineation failures, not physiology.
INTERVAL_RANGE_MS: dict[str, tuple[float, float]] = {"qrs_ms": (40.0, 250.0), "pr_ms": (60.0, 400.0),
                                                     "qt_ms": (200.0, 700.0)}

INSTALL_HINT = "pip install 'ecgfm-cli[features]' (or pip install neurokit2)"


class FeaturesError(EcgfmError, ValueError):
    """Input the features embedder cannot use; the message is one line for the user."""


def embedding_names() -> list[str]:
    """Column meaning of the embedding vector: the raw features, then one missing indicator each (D = 14)."""
    return list(FEATURES) + [f"{n}_missing" for n in FEATURES]


def require_neurokit() -> str:
    """Import neurokit2 (the ``features`` extra) and return its version; a one-line error naming the install."""
    try:
        import neurokit2
    except ImportError:
        raise FeaturesError(f"--features needs neurokit2, which is not installed: {INSTALL_HINT}") from None
    return str(neurokit2.__version__)


# ============================================================================ one segment


def rr_features(r_peaks: np.ndarray, fs: float) -> dict[str, float]:
    """R-peak sample indices -> heart rate (bpm), RR coefficient of variation, RMSSD / mean RR, pNN50 (fraction of
    successive RR differences > 50 ms). NaN where too few beats: HR and CV need 2 RR intervals, RMSSD and pNN50 2
    successive differences (3 intervals)."""
    out = dict.fromkeys(FEATURES[:4], math.nan)
    rr = np.diff(np.asarray(r_peaks, dtype=np.float64)) / fs  # seconds
    if len(rr) >= 2:
        mean = rr.mean()
        out["heart_rate_bpm"] = 60.0 / mean
        out["rr_cv"] = rr.std() / mean
    if len(rr) >= 3:
        d = np.diff(rr)
        out["rmssd_rel"] = math.sqrt(np.mean(d**2)) / rr.mean()
        out["pnn50"] = float(np.mean(np.abs(d) > 0.050))
    return out


def interval_ms(start: Sequence, end: Sequence, fs: float, name: str) -> float:
    """Median over beats of ``end - start`` (both per-beat sample indices from the delineator, NaN where it found
    none) in ms, keeping only beats within :data:`INTERVAL_RANGE_MS`; NaN when no beat qualifies."""
    a = np.asarray(start, dtype=np.float64)
    b = np.asarray(end, dtype=np.float64)
    if a.size == 0 or a.shape != b.shape:
        return math.nan
    ms = (b - a) / fs * 1000.0
    lo, hi = INTERVAL_RANGE_MS[name]
    ok = np.isfinite(ms) & (ms >= lo) & (ms <= hi)
    return float(np.median(ms[ok])) if ok.any() else math.nan


def segment_features(x: np.ndarray, fs: float) -> np.ndarray:
    """One lead of one segment, (L,) float -> (F,) float64 raw features (:data:`FEATURES`), NaN where undefined.

    neurokit2: ``ecg_clean`` (0.5 Hz high-pass, powerline filter), ``ecg_peaks`` (its default detector), then
    ``ecg_delineate(method="dwt")`` for the QRS (R onset -> R offset), PR (P onset -> R onset) and QT
    (R onset -> T offset) intervals. A detector that raises on a segment (too few beats, flat signal) leaves the
    affected features NaN.
    """
    import neurokit2 as nk

    out = dict.fromkeys(FEATURES, math.nan)
    x = np.asarray(x, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # neurokit2 warns per segment about short signals and missing waves
        try:
            clean = nk.ecg_clean(x, sampling_rate=int(fs))
            _, info = nk.ecg_peaks(clean, sampling_rate=int(fs))
            r = np.asarray(info["ECG_R_Peaks"], dtype=np.int64)
        except (ValueError, IndexError, ZeroDivisionError, KeyError):
            return np.array([out[n] for n in FEATURES])
        out.update(rr_features(r, fs))
        if len(r) >= 2:
            try:
                _, waves = nk.ecg_delineate(clean, r, sampling_rate=int(fs), method="dwt")
            except (ValueError, IndexError, ZeroDivisionError, KeyError, TypeError):
                waves = {}
            if waves:
                onset = waves.get("ECG_R_Onsets", [])
                out["qrs_ms"] = interval_ms(onset, waves.get("ECG_R_Offsets", []), fs, "qrs_ms")
                out["pr_ms"] = interval_ms(waves.get("ECG_P_Onsets", []), onset, fs, "pr_ms")
                out["qt_ms"] = interval_ms(onset, waves.get("ECG_T_Offsets", []), fs, "qt_ms")
    return np.array([out[n] for n in FEATURES])


def choose_lead(x: np.ndarray, present: np.ndarray, order: Sequence[int]) -> int | None:
    """Index of the first lead of ``order`` that is present, finite and not constant in segment ``x`` (C, L);
    None when there is none."""
    for c in order:
        if present[c] and np.isfinite(x[c]).all() and np.ptp(x[c]) > 0:
            return int(c)
    return None


def lead_order(contract_leads: Sequence[str], preferred: Sequence[str] | None = None) -> list[int]:
    """Row indices of the leads to try, best first: ``preferred`` (``--leads``) if given, else
    :data:`LEAD_PREFERENCE` then any other lead of the contract."""
    names = list(contract_leads)
    wanted = list(preferred) if preferred else [n for n in LEAD_PREFERENCE if n in names]
    if not preferred:
        wanted += [n for n in names if n not in wanted]
    return [names.index(n) for n in wanted if n in names]


def features_of_batch(args: tuple[np.ndarray, np.ndarray, list[int], float]) -> tuple[np.ndarray, np.ndarray]:
    """(signals (B, C, L), lead_present (B, C) bool, lead order, fs) -> (raw features (B, F) float64, lead used
    (B,) int, -1 where no usable lead). Module level: ``ordered_map`` sends it to worker processes."""
    x, present, order, fs = args
    feats = np.full((len(x), len(FEATURES)), np.nan)
    used = np.full(len(x), -1, dtype=np.int64)
    for i in range(len(x)):
        c = choose_lead(x[i], present[i], order)
        if c is not None:
            used[i] = c
            feats[i] = segment_features(x[i, c], fs)
    return feats, used


# ============================================================================ the whole input


def pool_records(record_ids: list[str], feats: np.ndarray) -> tuple[list[str], np.ndarray, list[int]]:
    """Per record (its segments contiguous in the input): the mean of each raw feature over the segments where it
    is defined (NaN if in none). Returns (record ids in input order, (R, F) float64, index of each record's first
    segment). A record whose segments are not contiguous raises :class:`FeaturesError`."""
    ids: list[str] = []
    starts: list[int] = []
    seen: set[str] = set()
    for i, rid in enumerate(record_ids):
        if not ids or rid != ids[-1]:
            if rid in seen:
                raise FeaturesError(f"--pool record: the segments of record {rid!r} are not contiguous in the input "
                                    "(embed each record's segments together, as `ecgfm segment` writes them)")
            seen.add(rid)
            ids.append(rid)
            starts.append(i)
    bounds = starts + [len(record_ids)]
    pooled = np.full((len(ids), feats.shape[1]), np.nan)
    for k in range(len(ids)):
        block = feats[bounds[k]:bounds[k + 1]]
        n = np.isfinite(block).sum(axis=0)
        total = np.where(np.isfinite(block), block, 0.0).sum(axis=0)
        pooled[k] = np.where(n > 0, total / np.maximum(n, 1), np.nan)
    return ids, pooled, starts


def finish_features(raw: np.ndarray) -> np.ndarray:
    """(N, F) raw features with NaN -> (N, 2F) float32: NaN replaced by :data:`FILL`, then one 0/1 missing
    indicator per feature (the logistic regression of ``probe`` cannot take NaN)."""
    missing = ~np.isfinite(raw)
    fill = np.array([FILL[n] for n in FEATURES])
    filled = np.where(missing, fill[None, :], raw)
    return np.concatenate([filled, missing.astype(np.float64)], axis=1).astype(np.float32)


@dataclass
class FeaturesSummary:
    segments: int = 0
    rows: int = 0
    nan_skipped: int = 0
    nan_examples: list[str] = field(default_factory=list)
    no_lead: int = 0
    missing: dict[str, int] = field(default_factory=dict)
    lead_used: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    dim: int = 0
    files: list[str] = field(default_factory=list)


def _batches(reader, batch_size: int) -> Iterator[Any]:
    yield from reader.iter_batches(["record_id", "patient_id", "segment_index", "signal", "lead_present"],
                                   batch_size=batch_size)


def run_features(reader, output, meta: dict[str, Any], contract_leads: Sequence[str], fs: float,
                 preferred: Sequence[str] | None = None, pool: str = "segment", nan: str = "refuse",
                 procs: int = 1, batch_size: int = 64) -> FeaturesSummary:
    """Compute the rhythm features of every segment of ``reader`` (a segments artifact) and write them to
    ``output`` (an ``Output`` of format dir/parquet/npz) as an embeddings artifact with ``meta`` in its metadata.

    contract_leads: the segments' lead order; fs: their sampling rate (Hz). preferred: lead names to try first
    (``--leads``). pool: ``segment`` or ``record``. nan: segments holding NaN/Inf in every lead are refused
    (``refuse``) or left out and counted (``skip``). procs: worker processes for neurokit2 (the cost).
    """
    import time

    from ecgfm_cli.console import progress
    from ecgfm_cli.embed import SHOW, NpzCollector, _clear_embeddings, embeddings_batch, embeddings_schema
    from ecgfm_cli.io.artifacts import ArtifactWriter, check_output_kind, write_done_marker
    from ecgfm_cli.io.schema import segment_signals
    from ecgfm_cli.parallel import ordered_map

    if output.format == "dir":  # refuse a foreign directory before the work, not after
        check_output_kind(output.path, "embeddings", "embed")
    order = lead_order(contract_leads, preferred)
    summary = FeaturesSummary()
    rids: list[str] = []
    pids: list = []
    segs: list[np.ndarray] = []
    jobs: list[tuple[list[str], list, np.ndarray]] = []

    def inputs() -> Iterator[tuple[np.ndarray, np.ndarray, list[int], float]]:
        for b in _batches(reader, batch_size):
            x = np.asarray(segment_signals(b), dtype=np.float32)
            present = np.stack(b.column("lead_present").to_numpy(zero_copy_only=False)).astype(bool) \
                if b.num_rows else np.zeros((0, len(contract_leads)), bool)
            rid = b.column("record_id").to_pylist()
            pid = b.column("patient_id").to_pylist()
            seg = b.column("segment_index").to_numpy(zero_copy_only=False).astype(np.int32)
            summary.segments += len(rid)
            # a segment is unusable only when no lead is finite: another lead is chosen for one NaN lead
            finite = np.isfinite(x).all(axis=2) & present
            bad = ~finite.any(axis=1) & ~np.isfinite(x).all(axis=(1, 2))
            if bad.any():
                where = np.flatnonzero(bad)
                examples = [f"{rid[i]} segment {seg[i]}" for i in where[:SHOW]]
                if nan != "skip":
                    raise FeaturesError(f"{len(where)} segment(s) hold NaN/Inf in every lead, e.g. "
                                        f"{'; '.join(examples)} (pass --nan skip to leave them out)")
                summary.nan_skipped += len(where)
                summary.nan_examples = (summary.nan_examples + examples)[:SHOW]
                keep = np.flatnonzero(~bad)
                x, present, seg = x[keep], present[keep], seg[keep]
                rid, pid = [rid[i] for i in keep], [pid[i] for i in keep]
            jobs.append((rid, pid, seg))
            yield x, present, order, fs

    total = reader.num_rows()
    t0 = time.perf_counter()
    results = map(features_of_batch, inputs()) if procs <= 1 else ordered_map(features_of_batch, inputs(), procs)
    parts = []
    used_all = []
    for k, (feats, used) in enumerate(progress(results, "embed --features", unit="batch",
                                               total=math.ceil(total / batch_size) if total else None)):
        rid, pid, seg = jobs[k]
        rids += rid
        pids += pid
        segs.append(seg)
        parts.append(feats)
        used_all.append(used)
    summary.seconds = time.perf_counter() - t0
    if summary.segments == 0:
        raise FeaturesError("the input holds no segments")
    if not rids:
        raise FeaturesError(f"no features were written: all {summary.nan_skipped} segment(s) hold NaN/Inf")
    raw = np.concatenate(parts)
    used = np.concatenate(used_all)
    summary.no_lead = int((used < 0).sum())
    names = list(contract_leads)
    summary.lead_used = {names[c]: int((used == c).sum()) for c in sorted(set(used[used >= 0].tolist()))}
    seg_index = np.concatenate(segs).astype(np.int32)
    if pool == "record":
        ids, raw, starts = pool_records(rids, raw)
        pids = [pids[i] for i in starts]
        rids, seg_index = ids, np.full(len(ids), -1, dtype=np.int32)
    summary.missing = {n: int(c) for n, c in zip(FEATURES, (~np.isfinite(raw)).sum(axis=0), strict=True)}
    emb = finish_features(raw)
    dim = emb.shape[1]
    summary.dim, summary.rows = dim, len(rids)

    schema_meta = {f"ecgfm.{k}": v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in meta.items()}
    schema = embeddings_schema(dim).with_metadata(schema_meta)
    step = 4096
    batches = [embeddings_batch(rids[i:i + step], pids[i:i + step], seg_index[i:i + step], emb[i:i + step], schema)
               for i in range(0, len(rids), step)]
    if output.format == "npz":
        sink = NpzCollector()
        for b in batches:
            sink.write(b)
        sink.save(output.path, dim, meta)
        summary.files = [str(output.path)]
        return summary
    if output.format == "dir":
        _clear_embeddings(output.path)
    writer = ArtifactWriter(output, "embeddings", schema, row_group_rows=1024)
    try:
        for b in batches:
            writer.write(b)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    if output.format == "dir":
        write_done_marker(output.path, (0, 1), {"kind": "embeddings", "shard": [0, 1], "rows": summary.rows,
                                                "segments": summary.segments})
    summary.files = [str(f) for f in writer.files]
    return summary


def features_meta(version: str, lead_order_names: Sequence[str]) -> dict[str, Any]:
    """The ``ecgfm.model`` metadata of a features artifact: what each embedding column is and how it was made."""
    return {"kind": "features", "features": "rhythm", "checkpoint": None, "library": f"neurokit2 {version}",
            "columns": embedding_names(), "fill": dict(FILL), "lead_order": list(lead_order_names),
            "interval_range_ms": {k: list(v) for k, v in INTERVAL_RANGE_MS.items()},
            "method": "ecg_clean + ecg_peaks (neurokit) + ecg_delineate (dwt) on the first usable lead"}
