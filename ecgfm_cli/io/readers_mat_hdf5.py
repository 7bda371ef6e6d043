"""Header-less containers: CPSC-2018 / fairseq-signals ``.mat``, CODE-15% / SPH HDF5.

Each source's lead order is the standard 12 (``contract.STANDARD_LEADS``) and its sampling rate
is fixed by the dataset (CPSC 500 Hz, CODE-15% 400 Hz, SPH 500 Hz) or stored (fairseq
``curr_sample_rate``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ecgfm_cli.contract import STANDARD_LEADS
from ecgfm_cli.io.readers_common import check_sample_rate, check_size
from ecgfm_cli.io.record import RawRecord, RejectedRecord
from ecgfm_cli.io.wfdb_header import parse_age, parse_sex

CPSC_FS = 500.0
CODE15_FS = 400.0
SPH_FS = 500.0
_CODE15_CHUNK = 64  # exams decoded per HDF5 read: bounds memory on 20k-exam part files


def _leads_signal(x: np.ndarray, where: str) -> np.ndarray:
    """Orient a 2-D array as (12, n) float32; reject anything else as not an ECG."""
    x = np.asarray(x)
    if x.ndim != 2 or x.dtype.kind not in "iuf":
        raise RejectedRecord("not_ecg", f"{where}: expected a 12 x N numeric matrix, got shape {x.shape} "
                                        f"{x.dtype}")
    if x.shape[0] != 12 and x.shape[1] == 12:
        x = x.T
    if x.shape[0] != 12:
        raise RejectedRecord("not_ecg", f"{where}: expected 12 leads, got shape {x.shape}")
    if x.shape[1] == 0:
        raise RejectedRecord("empty", f"{where}: 0 samples")
    return np.ascontiguousarray(x, dtype=np.float32)


def _scalar(v) -> object:
    """Unwrap scipy.io.loadmat's nested 1x1 arrays into a Python scalar/str (None if empty)."""
    while isinstance(v, np.ndarray):
        if v.size == 0:
            return None
        v = v.reshape(-1)[0]
    if isinstance(v, bytes):
        v = v.decode("latin-1")
    if isinstance(v, np.generic):
        v = v.item()
    return v


def _check_mat_size(path: Path, max_samples: int | None) -> None:
    """too_large from the matrix shapes a .mat declares (scipy reads the variable headers only), before loading it.
    A struct's fields (CPSC's ``ECG.data``) are not listed: they are checked once loaded."""
    import scipy.io

    try:
        listed = scipy.io.whosmat(str(path))
    except Exception:  # noqa: BLE001 - a corrupt file is reported by the full read that follows
        return
    for var, shape, _cls in listed:
        if len(shape) == 2:
            check_size(max(shape), min(shape), max_samples, f"{path.name} variable {var}")


def read_mat(path: Path, record_id: str, max_samples: int | None = None) -> RawRecord:
    """A standalone ``.mat`` (no ``.hea``): CPSC-2018 struct ``ECG`` or fairseq ``feats``.
    max_samples: the most samples per lead (``too_large`` beyond; None for no bound)."""
    import scipy.io

    _check_mat_size(path, max_samples)
    try:
        m = scipy.io.loadmat(str(path))
    except NotImplementedError as e:  # v7.3 (HDF5-based) .mat
        raise RejectedRecord("not_ecg", f"{path.name}: {e}") from None
    except Exception as e:  # noqa: BLE001 - scipy raises many types on corrupt files
        raise RejectedRecord("unreadable", f"{path.name}: not a readable MATLAB file ({type(e).__name__}: {e})") \
            from None
    base = dict(record_id=record_id, source_path=os.path.abspath(path), leads=list(STANDARD_LEADS))
    if "ECG" in m:
        ecg = m["ECG"]
        names = ecg.dtype.names or ()
        if "data" not in names:
            raise RejectedRecord("not_ecg", f"{path.name}: struct ECG has no field 'data'")
        signal = _leads_signal(ecg["data"].reshape(-1)[0], f"{path.name} ECG.data")
        check_size(signal.shape[1], 12, max_samples, f"{path.name} ECG.data")
        sex = _scalar(ecg["sex"]) if "sex" in names else None
        age = _scalar(ecg["age"]) if "age" in names else None
        return RawRecord(source_format="cpsc-mat", sample_rate=CPSC_FS, signal=signal, units=["mV"] * 12,
                         sex=parse_sex(str(sex)) if sex is not None else None,
                         age=parse_age(str(age)) if age is not None else None, **base)
    if "feats" in m:
        if "curr_sample_rate" not in m:
            raise RejectedRecord("bad_sample_rate", f"{path.name}: 'feats' without 'curr_sample_rate'")
        fs = check_sample_rate(_scalar(m["curr_sample_rate"]), f"{path.name} curr_sample_rate")
        signal = _leads_signal(m["feats"], f"{path.name} feats")
        comments = {}
        for key in ("idx", "org_sample_rate", "org_sample_size"):
            if key in m and _scalar(m[key]) is not None:
                comments[key] = str(_scalar(m[key]))
        return RawRecord(source_format="fairseq-mat", sample_rate=fs, signal=signal, units=["mV"] * 12,
                         comments=comments, **base)
    keys = sorted(k for k in m if not k.startswith("__"))
    hint = " (a WFDB signal matrix: read it through its .hea header)" if "val" in keys else ""
    raise RejectedRecord("not_ecg", f"{path.name}: no known ECG layout, keys {keys}{hint}")


def _strip_zero_padding(x: np.ndarray) -> np.ndarray:
    """Drop leading/trailing samples where every lead is exactly zero (ECG-FM's CODE-15% strip_zeros).

    x: (n_leads, n) -> (n_leads, m), m <= n; m == 0 when the exam is all zeros.
    """
    nz = np.flatnonzero(np.any(x != 0, axis=0))
    if nz.size == 0:
        return x[:, :0]
    return x[:, nz[0]: nz[-1] + 1]


def _str_id(v) -> str | None:
    v = _scalar(v)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v)


def read_hdf5(path: Path, record_id: str, max_samples: int | None = None) -> Iterator[RawRecord | RejectedRecord]:
    """CODE-15% (``tracings`` N x 4096 x 12, ``exam_id``) or SPH (``ecg`` 12 x N) HDF5.
    max_samples: the most samples per lead, checked against the dataset's shape before reading it."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except Exception as e:  # noqa: BLE001 - h5py raises OSError and others on corrupt files
        yield RejectedRecord("unreadable", f"{path.name}: not a readable HDF5 file ({e})", str(path), record_id)
        return
    with f:
        src = os.path.abspath(path)
        if "tracings" in f:
            yield from _read_code15(f, path, src, record_id, max_samples)
        elif "ecg" in f and isinstance(f["ecg"], h5py.Dataset):
            try:
                shape = f["ecg"].shape
                if len(shape) == 2:
                    check_size(max(shape), min(shape), max_samples, f"{path.name} dataset ecg {shape}")
                signal = _leads_signal(f["ecg"][()], f"{path.name} dataset ecg")
            except RejectedRecord as e:
                e.path, e.record_id = str(path), record_id
                yield e
                return
            yield RawRecord(record_id=record_id, source_path=src, source_format="sph-hdf5", sample_rate=SPH_FS,
                            leads=list(STANDARD_LEADS), signal=signal, units=["mV"] * 12)
        else:
            yield RejectedRecord("not_ecg", f"{path.name}: no 'tracings' (CODE-15%) or 'ecg' (SPH) dataset; "
                                            f"found {sorted(f.keys())[:10]}", str(path), record_id)


def _read_code15(f, path: Path, src: str, record_id: str,
                 max_samples: int | None) -> Iterator[RawRecord | RejectedRecord]:
    tr = f["tracings"]
    if tr.ndim != 3 or tr.shape[2] != 12:
        yield RejectedRecord("not_ecg", f"{path.name}: 'tracings' has shape {tr.shape}, expected (N, n, 12)",
                             str(path), record_id)
        return
    try:
        check_size(tr.shape[1], 12, max_samples, f"{path.name} tracings {tr.shape}")
    except RejectedRecord as e:
        e.path, e.record_id = str(path), record_id
        yield e
        return
    n = tr.shape[0]
    exam_ids = [_str_id(v) for v in f["exam_id"][()]] if "exam_id" in f else [str(i) for i in range(n)]
    patient_ids = [_str_id(v) for v in f["patient_id"][()]] if "patient_id" in f else [None] * n
    if len(exam_ids) != n:
        yield RejectedRecord("size_mismatch", f"{path.name}: {len(exam_ids)} exam_id values for {n} tracings",
                             str(path), record_id)
        return
    for start in range(0, n, _CODE15_CHUNK):
        block = tr[start: start + _CODE15_CHUNK]
        for j in range(block.shape[0]):
            i = start + j
            rid = f"{record_id}#{exam_ids[i]}"
            x = _strip_zero_padding(block[j].T)
            if x.shape[1] == 0:
                yield RejectedRecord("empty", f"{path.name} tracings[{i}] (exam_id {exam_ids[i]}): all zeros",
                                     str(path), rid)
                continue
            yield RawRecord(record_id=rid, source_path=src, source_format="code15-hdf5", sample_rate=CODE15_FS,
                            leads=list(STANDARD_LEADS), signal=np.ascontiguousarray(x, dtype=np.float32),
                            units=["mV"] * 12, patient_id=patient_ids[i] if i < len(patient_ids) else None,
                            study_id=exam_ids[i])
