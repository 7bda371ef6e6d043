"""ECG-FM's preprocessing as pure numpy functions (reference: shared/reference/ecg-fm.md section 3).

raw (n_leads, n) at fs Hz
  -> reorder_leads: rows in contract order by lead NAME, absent leads zero-filled and flagged
  -> resample_linear: to 500 Hz, n_new = int(n * 500 / fs), endpoints aligned (interp1d semantics)
  -> zscore: per lead over the whole record; a constant lead becomes 0
  -> windows: non-overlapping 2500-sample windows from the start, remainder dropped, not re-normalised
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ecgfm_cli.contract import canonical_lead, is_inverted


class PreprocessError(ValueError):
    """A record that cannot become model input; ``reason`` is a rejects-table code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@functools.lru_cache(maxsize=256)
def _lead_plan(leads: tuple[str, ...], order: tuple[str, ...],
               lead_map: tuple[tuple[str, str], ...]) -> tuple[tuple[tuple[int, int, bool], ...], bool]:
    """((stored row, output slot, negate), ...) of the recognised leads, and whether the stored rows are
    exactly ``order``; raises :class:`PreprocessError` like :func:`reorder_leads`. ``negate`` marks a lead
    stored inverted (``-aVR``, the Cabrera display), which becomes aVR with its sign restored."""
    slot = {name: i for i, name in enumerate(order)}
    lmap = dict(lead_map)
    seen: dict[str, str] = {}
    pairs = []
    for row, name in enumerate(leads):
        canon = canonical_lead(name, lmap)
        if canon is None or canon not in slot:
            continue
        if canon in seen:
            raise PreprocessError("duplicate_lead", f"leads {seen[canon]!r} and {name!r} are both {canon}")
        seen[canon] = name
        pairs.append((row, slot[canon], is_inverted(name, lmap)))
    if not pairs:
        raise PreprocessError(
            "unknown_lead",
            f"no recognisable lead among {list(leads)}; name them with --lead-map, e.g. --lead-map {leads[0]}=I"
            if len(leads) else "the record has no leads")
    identity = len(leads) == len(order) and all(r == s and not neg for r, s, neg in pairs) and len(pairs) == len(order)
    return tuple(pairs), identity


def _reorder(signal: np.ndarray, leads: Sequence[str], order: Sequence[str],
             lead_map: dict[str, str] | tuple[tuple[str, str], ...] | None,
             copy: bool) -> tuple[np.ndarray, np.ndarray]:
    lm = tuple(lead_map.items()) if isinstance(lead_map, dict) else tuple(lead_map or ())
    pairs, identity = _lead_plan(tuple(leads), tuple(order), lm)
    dtype = signal.dtype if signal.dtype.kind == "f" else np.float64
    if identity:  # already in contract order: the rows as they are (a copy only when asked or converting)
        return signal.astype(dtype, copy=copy), np.ones(len(order), dtype=bool)
    out = np.zeros((len(order), signal.shape[1]), dtype=dtype)
    present = np.zeros(len(order), dtype=bool)
    for row, slot, negate in pairs:
        if negate:
            np.negative(signal[row], out=out[slot])
        else:
            out[slot] = signal[row]
        present[slot] = True
    return out, present


def reorder_leads(signal: np.ndarray, leads: Sequence[str], order: Sequence[str],
                  lead_map: dict[str, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``signal`` (n_leads, n) rearranged into ``order`` by lead name.

    Returns (out (len(order), n) in the input's float dtype, present (len(order),) bool). Absent leads are zero rows
    with present False; stored leads that are not in ``order`` are ignored. Raises
    :class:`PreprocessError` when no lead is recognised or two stored leads map to the same name.
    """
    return _reorder(signal, leads, order, lead_map, copy=True)


def resampled_length(n: int, fs: float, target_fs: float) -> int:
    """ECG-FM's output length: ``int(n * target_fs / fs)``."""
    return int(n * target_fs / fs)


@functools.lru_cache(maxsize=64)
def _interp_plan(n: int, n_new: int) -> tuple[np.ndarray, np.ndarray]:
    """For each output sample: the input sample on its left and its weight towards the right one."""
    x_old = np.linspace(0.0, n_new - 1, n)
    t = np.arange(n_new, dtype=np.float64)
    hi = np.clip(np.searchsorted(x_old, t, side="left"), 1, n - 1)
    lo = hi - 1
    return lo, ((t - x_old[lo]) / (x_old[hi] - x_old[lo]))


def resample_linear(signal: np.ndarray, fs: float, target_fs: float) -> np.ndarray:
    """Linear-interpolation resampling of (n_leads, n) to ``int(n * target_fs / fs)`` samples.

    Same function as ECG-FM's ``interp1d(linspace(0, n_new - 1, n), x)(arange(n_new))``: the
    first and last input samples land on the first and last output samples. Computed in the
    input's float dtype (float32 input: within 1e-6 of the float64 result for z-scored data).
    """
    n = signal.shape[1]
    n_new = resampled_length(n, fs, target_fs)
    if n_new == n:
        return signal
    if n < 2 or n_new < 2:
        return signal[:, :max(n_new, 0)] if n_new <= n else np.repeat(signal[:, :1], n_new, axis=1)
    lo, w = _interp_plan(n, n_new)
    left = np.take(signal, lo, axis=1)  # np.take keeps C order; signal[:, lo] would not
    out = np.take(signal, lo + 1, axis=1)
    out -= left
    out *= w.astype(out.dtype, copy=False)
    out += left
    return out


def zscore_terms(signal: np.ndarray, constant: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-lead mean and ``1 / std`` (population std) of (n_leads, n), as (n_leads, 1) float64 columns; the
    scale of a constant lead (max == min) is 0, so it becomes 0 (ECG-FM's ``constant_lead_strategy='zero'``).

    Float32 input is summed pairwise in float32 (relative error ~1e-7, well inside ECG-FM parity). Constancy is
    decided exactly, not from the std: a flat lead at 0.1 has a float32 std of ~1e-8, not 0, and would
    otherwise become +-1 everywhere. ``constant`` (n_leads,) bool, when the caller already knows which leads are
    constant (:func:`segment_record` does), saves the max/min passes.
    """
    mean = signal.mean(axis=1, keepdims=True)
    centred = signal - mean.astype(signal.dtype)
    var = np.square(centred, out=centred).mean(axis=1, keepdims=True)
    std = np.sqrt(var, dtype=np.float64)
    if not signal.shape[1]:
        constant = np.ones(signal.shape[0], dtype=bool)
    elif constant is None:
        constant = signal.max(axis=1) == signal.min(axis=1)
    constant = constant[:, None] | ~(std > 0)
    return mean.astype(np.float64), np.where(constant, 0.0, 1.0 / np.where(constant, 1.0, std))


def zscore(signal: np.ndarray, out: np.ndarray | None = None, constant: np.ndarray | None = None) -> np.ndarray:
    """Each lead of (n_leads, n) minus its mean, divided by its (population) std; constant leads -> 0.

    ``out`` (n_leads, n), e.g. a transposed view of the final window array, receives the result
    (float32 by default) so that no further copy is needed. ``constant``: see :func:`zscore_terms`.
    """
    mean, scale = zscore_terms(signal, constant)
    if out is None:
        out = np.empty(signal.shape, dtype=np.float32)
    np.subtract(signal, mean.astype(signal.dtype), out=out, casting="unsafe")
    np.multiply(out, scale.astype(out.dtype), out=out)
    return out


def window_starts(n: int, window: int, stride: int) -> np.ndarray:
    """Start samples of the full windows of length ``window`` every ``stride`` samples."""
    if n < window:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, n - window + 1, stride, dtype=np.int64)


#: Leads whose peak |amplitude| exceeds this are rescaled by a power of two before the z-score (float32 squares
#: overflow above ~1.8e19; no ECG in any unit comes near it).
_SAFE_PEAK = 1e15


@dataclass(frozen=True)
class SegmentOptions:
    """How records become windows (ECG-FM's defaults)."""

    sample_rate: int = 500
    window: int = 2500
    stride: int = 2500
    leads: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
    lead_map: tuple[tuple[str, str], ...] = ()
    nan: str = "zero"  # "zero": zero a lead holding NaN and flag it absent; "drop": reject the record
    pad: bool = False  # zero-pad a record shorter than one window instead of rejecting it


@dataclass
class Segmented:
    """The windows of one record: ``windows`` (n_windows, n_leads, window) float32, ``starts``
    (n_windows,) int64, ``present`` (n_leads,) bool (False: absent in the file, NaN, or flat), ``padded`` True
    when zero-padded."""

    windows: np.ndarray
    starts: np.ndarray
    present: np.ndarray
    padded: bool
    nan_leads: list[str]
    flat_leads: list[str] = field(default_factory=list)  # constant over the record: zeros, flagged absent


def segment_record(signal: np.ndarray, leads: Sequence[str], fs: float, opts: SegmentOptions) -> Segmented:
    """Apply ECG-FM's preprocessing to one record (n_leads, n) -> windows; see module docstring."""
    if not fs or fs <= 0 or not np.isfinite(fs):
        raise PreprocessError("bad_sample_rate", f"sampling rate {fs!r}")
    signal = np.asarray(signal)
    # x may be ``signal`` itself (leads already in contract order): it is only read, never written
    x, present = _reorder(signal, leads, opts.leads, opts.lead_map, copy=False)
    # NaN (missing samples) or +-inf in a lead: max/min propagate NaN and show inf; no boolean temporary
    if x.shape[1]:
        top, bottom = x.max(axis=1), x.min(axis=1)
        nan_rows = ~(np.isfinite(top) & np.isfinite(bottom))
        flat_rows = present & ~nan_rows & (top == bottom)  # a stored lead with no signal (z-scores to 0)
    else:
        nan_rows = flat_rows = np.zeros(x.shape[0], dtype=bool)
    nan_leads = [opts.leads[i] for i in np.flatnonzero(nan_rows)]
    if nan_leads:
        if opts.nan == "drop":
            raise PreprocessError("nan_lead", f"NaN or infinite values in lead(s) {', '.join(nan_leads)} (--nan zero "
                                  "keeps the record)")
        n_bad = dict(zip(nan_leads, (~np.isfinite(x[nan_rows])).sum(axis=1).tolist(), strict=True))
        if x is signal:
            x = x.copy()
        x[nan_rows] = 0.0
        present &= ~nan_rows
    flat_leads = [opts.leads[i] for i in np.flatnonzero(flat_rows)]
    present &= ~flat_rows
    if x.shape[1] and not present.any():
        if nan_leads:  # say how few samples it took: a gain that overflows a handful of samples does this
            shown = ", ".join(f"{k}: {v}" for k, v in list(n_bad.items())[:4]) + (", ..." if len(n_bad) > 4 else "")
            flat = f"; flat: {', '.join(flat_leads)}" if flat_leads else ""
            raise PreprocessError("nan_lead", f"no lead left: NaN or infinite samples in {shown} of {x.shape[1]}"
                                  f"{flat}; --nan zero zeroes a lead holding any, which leaves nothing to embed")
        raise PreprocessError("no_signal", "every lead is flat, NaN or missing: nothing to embed")
    # amplitudes near float32's limit (a header gain off by many orders of magnitude) would overflow the z-score's
    # sums: a power-of-two rescale is exact and the z-score does not depend on the scale
    peak = np.maximum(np.abs(top), np.abs(bottom)) if x.shape[1] else np.zeros(0)
    huge = present & ~nan_rows & (peak > _SAFE_PEAK)
    if huge.any():
        x = x.copy() if x is signal else x
        x[huge] *= np.exp2(-np.ceil(np.log2(peak[huge])))[:, None].astype(x.dtype)
    # from here ~present marks the constant leads (absent and NaN ones are zero rows, flat ones stay flat through
    # linear resampling), so the z-score needs no max/min pass of its own
    x = resample_linear(x, fs, opts.sample_rate)
    n = x.shape[1]
    padded = False
    if n < opts.window:
        if not opts.pad:
            raise PreprocessError(
                "too_short", f"{n} samples at {opts.sample_rate} Hz < one {opts.window}-sample window (--pad keeps it)")
        if n == 0:
            raise PreprocessError("empty", "no samples")
        z = zscore(x, constant=~present)
        windows = np.zeros((1, x.shape[0], opts.window), dtype=np.float32)
        windows[0, :, :n] = z
        return Segmented(windows, np.zeros(1, dtype=np.int64), present, True, nan_leads, flat_leads)
    starts = window_starts(n, opts.window, opts.stride)
    if opts.stride == opts.window:
        # z-score straight into the (n_windows, n_leads, window) layout: one pass, no transposing copy
        used = len(starts) * opts.window
        windows = np.empty((len(starts), x.shape[0], opts.window), dtype=np.float32)
        mean, scale = zscore_terms(x, ~present)
        view = windows.transpose(1, 0, 2)
        src = x[:, :used].reshape(x.shape[0], len(starts), opts.window)
        np.subtract(src, mean[:, :, None].astype(x.dtype), out=view, casting="unsafe")
        np.multiply(view, scale[:, :, None].astype(np.float32), out=view)
    else:
        z = zscore(x, constant=~present)
        windows = z[:, starts[:, None] + np.arange(opts.window)[None, :]].transpose(1, 0, 2)
    return Segmented(windows, starts, present, padded, nan_leads, flat_leads)
