"""WFDB records (``.hea`` + ``.dat`` / MATLAB ``.mat``): a fast numpy path and a wfdb-python fallback.

The fast path decodes single-segment records whose signals have one sample per frame and no
skew, in formats 8, 16, 24, 32, 61, 80, 160, 212, 310 and 311, from ``.dat`` files or MATLAB
v4/v5 ``.mat`` files. Everything else (multi-segment, multi-frequency, skewed, compressed
formats) goes to ``wfdb.rdrecord``. Physical values equal wfdb-python's
``(digital - baseline) / gain`` computed in float64, rounded to float32, with each format's
invalid-sample value mapped to NaN.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np

from ecgfm_cli.io.readers_common import (
    check_amplitude,
    check_leads,
    check_sample_rate,
    check_size,
    mimic_ids,
)
from ecgfm_cli.io.record import RawRecord, RejectedRecord
from ecgfm_cli.io.wfdb_header import HeaderError, SignalSpec, WfdbHeader, parse_comments, parse_header

#: bytes per sample (as a fraction for the packed formats)
_BYTES_PER_SAMPLE = {"8": 1, "16": 2, "61": 2, "80": 1, "160": 2, "24": 3, "32": 4,
                     "212": 1.5, "310": 4 / 3, "311": 4 / 3}
_INVALID = {"80": -(2**7), "310": -(2**9), "311": -(2**9), "212": -(2**11), "16": -(2**15),
            "61": -(2**15), "160": -(2**15), "24": -(2**23), "32": -(2**31), "8": None}
FAST_FORMATS = frozenset(_BYTES_PER_SAMPLE)
#: every format of the WFDB specification: the fast ones, FLAC (compressed, read by wfdb-python) and 0 (null signal)
WFDB_FORMATS = FAST_FORMATS | {"0", "508", "516", "524"}
_COMPRESSED = frozenset({"508", "516", "524"})


def _n_bytes(fmt: str, n_samples: int) -> int:
    if fmt == "212":
        return (3 * n_samples + 1) // 2
    if fmt in ("310", "311"):
        return 4 * (n_samples // 3) + (0, 2, 4)[n_samples % 3] if fmt == "310" else \
            4 * (n_samples // 3) + (0, 2, 3)[n_samples % 3]
    return int(_BYTES_PER_SAMPLE[fmt]) * n_samples


def decode(buf: np.ndarray | bytes, fmt: str, n_samples: int) -> np.ndarray:
    """Decode ``n_samples`` interleaved samples of WFDB format ``fmt`` from raw bytes.

    Returns a 1-D integer array (int16 or int32) of digital values; format 8 returns the
    first differences (the caller integrates them).
    """
    b = np.frombuffer(buf, dtype=np.uint8)
    if fmt == "16":
        return b[: 2 * n_samples].view("<i2")
    if fmt == "61":
        return b[: 2 * n_samples].view(">i2").astype(np.int16)
    if fmt == "32":
        return b[: 4 * n_samples].view("<i4")
    if fmt == "8":
        return b[:n_samples].view(np.int8)
    if fmt == "80":
        return b[:n_samples].astype(np.int16) - 128
    if fmt == "160":
        return (b[: 2 * n_samples].view("<u2").astype(np.int32) - 32768).astype(np.int16)
    if fmt == "24":
        t = b[: 3 * n_samples].reshape(-1, 3).astype(np.int32)
        v = t[:, 0] | (t[:, 1] << 8) | (t[:, 2] << 16)
        return np.where(v >= 1 << 23, v - (1 << 24), v).astype(np.int32)
    if fmt == "212":
        n_pairs = (n_samples + 1) // 2
        need = 3 * n_pairs
        raw = b[:need]
        if raw.size < need:
            raw = np.concatenate([raw, np.zeros(need - raw.size, np.uint8)])
        t = raw.reshape(-1, 3).astype(np.int16)
        out = np.empty(2 * n_pairs, np.int16)
        out[0::2] = t[:, 0] | ((t[:, 1] & 0x0F) << 8)
        out[1::2] = t[:, 2] | ((t[:, 1] & 0xF0) << 4)
        out[out > 2047] -= 4096
        return out[:n_samples]
    if fmt in ("310", "311"):
        from wfdb.io._signal import _blocks_to_samples  # packed 10-bit formats are rare

        return _blocks_to_samples(b[: _n_bytes(fmt, n_samples)].copy(), n_samples, fmt)
    raise ValueError(f"format {fmt} has no fast decoder")


def physical(digital: np.ndarray, gain: np.ndarray, baseline: np.ndarray,
             invalid: list[int | None]) -> np.ndarray:
    """(n_sig, n) integer ADC values -> (n_sig, n) float32 physical values, NaN where invalid.

    Equals wfdb-python's float64 ``(d - baseline) / gain`` rounded to float32. When the gains
    are float32-exact and ``d - baseline`` is exact in float32 (|.| < 2**24) the division is done
    in float32 directly: a correctly rounded float32 quotient equals the float64 quotient
    rounded to float32 (double rounding is innocuous for division when 53 >= 2 * 24 + 2).
    """
    g32, b32 = gain.astype(np.float32), baseline.astype(np.float32)
    exact = (digital.dtype.itemsize <= 2 and np.array_equal(g32, gain) and np.all(np.abs(baseline) < 2**23))
    out = np.empty(digital.shape, dtype=np.float32)
    if exact:
        np.copyto(out, digital, casting="unsafe")
        if b32.any():
            out -= b32[:, None]
        out /= g32[:, None]
    else:
        out[...] = (digital - baseline[:, None]) / gain[:, None]
    bad_values = {v for v in invalid if v is not None}
    if bad_values and digital.size and digital.min() <= max(bad_values):
        for ch, bad in enumerate(invalid):
            if bad is not None:
                mask = digital[ch] == bad
                if mask.any():
                    out[ch, mask] = np.nan
    return out


# ---------------------------------------------------------------------------------------------
# MATLAB .mat signal files


def parse_mat_v4_header(head: bytes) -> tuple[str, int, int, int, str] | None:
    """(dtype, rows, cols, data_offset, name) of the first MATLAB v4 matrix, or None if not v4.

    A v4 matrix is a 20-byte header (type MOPT, rows, cols, imagf, name length; int32 each)
    followed by the name and the column-major data.
    """
    if len(head) < 20 or head[:6] == b"MATLAB":
        return None
    for endian in ("<", ">"):
        mopt, rows, cols, imagf, namlen = np.frombuffer(head[:20], dtype=f"{endian}i4").tolist()
        if 0 <= mopt < 5000 and rows >= 0 and cols >= 0 and imagf in (0, 1) and 0 < namlen < 64:
            m, rest = divmod(mopt, 1000)
            o, rest = divmod(rest, 100)
            p, t = divmod(rest, 10)
            if o != 0 or t != 0 or p > 5 or (m == 0) != (endian == "<"):
                continue
            code = ("f8", "f4", "i4", "i2", "u2", "u1")[p]
            name = head[20:20 + namlen].split(b"\0", 1)[0].decode("latin-1")
            return endian + code, rows, cols, 20 + namlen, name
    return None


def _mat_v5_matrix(path: Path, n_sig: int) -> np.ndarray:
    """The first numeric 2-D matrix (``val`` preferred) of a v5 .mat, shaped (n_sig, n)."""
    import scipy.io

    m = scipy.io.loadmat(str(path))
    keys = ["val"] + [k for k in m if not k.startswith("__") and k != "val"]
    for k in keys:
        v = m.get(k)
        if isinstance(v, np.ndarray) and v.ndim == 2 and v.dtype.kind in "iuf":
            if v.shape[0] != n_sig and v.shape[1] == n_sig:
                v = v.T
            return v
    raise RejectedRecord("not_ecg", f"{path.name}: no numeric matrix in this .mat file")


# ---------------------------------------------------------------------------------------------


def _signal_path(hea: Path, name: str, where: str, what: str = "signal file") -> Path:
    """The file a header line names, which must lie inside the header's own folder tree (a header can name any
    path: ``../../etc/passwd``, another record's file by absolute path). Tolerates another spelling of the case."""
    dirname = hea.parent
    p = dirname / name
    if not os.path.lexists(p):
        try:  # tolerate a header that spells the file name in another case
            low = name.lower()
            p = next((dirname / e for e in os.listdir(dirname) if e.lower() == low), p)
        except OSError:
            pass
    plain = os.sep not in name and "/" not in name and name not in (".", "..") and not os.path.islink(p)
    if not plain:  # a bare file name that is no symlink stays in the folder: no realpath needed (the usual case)
        real = os.path.realpath(p)
        # the header's folder, and the folder of the file a symlinked header points to (a folder of symlinks to a
        # dataset elsewhere keeps working)
        roots = {os.path.realpath(dirname), os.path.dirname(os.path.realpath(hea))}
        if os.path.isabs(name) or not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
            raise RejectedRecord("bad_path", f"{where}: {what} {name!r} lies outside the record's folder "
                                             f"{dirname} (resolves to {real})")
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise RejectedRecord("missing_data", f"{where}: {what} {name} not found") from None
    except OSError as e:  # a symlink loop (ELOOP), a permission error
        raise RejectedRecord("unreadable", f"{where}: {what} {name}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise RejectedRecord("missing_data", f"{where}: {what} {name} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise RejectedRecord("not_regular_file", f"{where}: {what} {name} is not a regular file (a FIFO or device); "
                                                 "not opened")
    return p


def _groups(signals: list[SignalSpec]) -> list[tuple[str, list[int]]]:
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(signals):
        groups.setdefault(s.file_name, []).append(i)
    return list(groups.items())


def _needs_fallback(h: WfdbHeader) -> str | None:
    if h.n_seg is not None:
        return "multi-segment record"
    for s in h.signals:
        if s.fmt not in FAST_FORMATS:
            return f"format {s.fmt}"
        if s.samps_per_frame != 1 or s.skew:
            return "multi-frequency or skewed signals"
        if s.file_name == "~":
            return "null signal file"
    for _name, idx in _groups(h.signals):
        if len({h.signals[i].fmt for i in idx}) > 1:
            return "mixed formats in one file"
    return None


def _read_group(hea: Path, h: WfdbHeader, idx: list[int], sig_len: int | None,
                max_samples: int | None) -> np.ndarray:
    """Digital values (len(idx), sig_len) of the signals stored in one file.

    The file must hold exactly what the header declares (byte offset + the format's bytes for sig_len frames):
    a larger file means the header's format or length is wrong (format 16 data labelled 8 or 212), not spare room.
    """
    first = h.signals[idx[0]]
    fmt, n_sig = first.fmt, len(idx)
    where = f"{hea.name} line {first.line}"
    path = _signal_path(hea, first.file_name, where)
    offset = first.byte_offset
    if path.suffix.lower() == ".mat":
        with open(path, "rb") as f:
            head = f.read(128)
        if head[:6] == b"MATLAB":
            _check_mat_v5_size(path, n_sig, max_samples, where)
            try:
                v = _mat_v5_matrix(path, n_sig)
            except RejectedRecord:
                raise
            except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file
                raise RejectedRecord("unreadable", f"{path.name}: {type(e).__name__}: {e}") from None
            if v.shape[0] != n_sig:
                raise RejectedRecord("size_mismatch", f"{path.name}: matrix has {v.shape[0]} rows, "
                                                      f"{where} expects {n_sig} signals")
            if sig_len is not None and v.shape[1] != sig_len:
                raise RejectedRecord("size_mismatch", f"{path.name}: {v.shape[1]} samples, header "
                                                      f"declares {sig_len}")
            if v.dtype.kind == "f" and not np.all(v == np.round(v)):
                raise RejectedRecord("unreadable", f"{path.name}: non-integer values in a WFDB signal matrix")
            return np.ascontiguousarray(v[:, :sig_len]).astype(np.int32)
        v4 = parse_mat_v4_header(head)
        # Challenge headers declare `16+24`; trust the matrix itself when the header omits the offset.
        if v4 is not None and v4[0] == "<i2" and v4[1] == n_sig and fmt == "16" and offset == 0:
            offset = v4[3]
    size = path.stat().st_size
    bps = _BYTES_PER_SAMPLE[fmt]
    avail = max(size - offset, 0)
    inferred = sig_len is None
    if sig_len is None:
        sig_len = int(avail // (bps * n_sig))
    check_size(sig_len, h.n_sig, max_samples, where if inferred else f"{hea.name} line {h.fs_line}")
    n = sig_len * n_sig
    need = _n_bytes(fmt, n)
    if avail < need:
        have = int(avail // (bps * n_sig))
        raise RejectedRecord("size_mismatch", f"{path.name} holds {have} of the {sig_len} samples per "
                                              f"signal declared in {hea.name} ({avail} of {need} bytes)")
    # A length inferred from the size leaves at most a partial frame over (wfdb-python ignores it too).
    spare = avail - need
    if spare and (not inferred or spare > _n_bytes(fmt, n_sig)):
        raise RejectedRecord("size_mismatch", f"{path.name} holds {avail} bytes after offset {offset} but {hea.name} "
                                              f"implies {need} ({sig_len} samples x {n_sig} signals in format {fmt}): "
                                              f"the header's format or length is wrong")
    with open(path, "rb") as f:
        if offset:
            f.seek(offset)
        buf = f.read(need)
    if len(buf) < need:
        raise RejectedRecord("unreadable", f"{path.name}: short read")
    d = decode(buf, fmt, n).reshape(sig_len, n_sig)
    if fmt == "8":
        init = np.array([h.signals[i].init_value or 0 for i in idx], dtype=np.int32)
        d = np.cumsum(d, axis=0, dtype=np.int32) + init
    return d.T


def _check_mat_v5_size(path: Path, n_sig: int, max_samples: int | None, where: str) -> None:
    """too_large from the shapes a v5 .mat declares (scipy reads only the variable headers), before loading it."""
    import scipy.io

    try:
        shapes = [shape for _name, shape, _cls in scipy.io.whosmat(str(path)) if len(shape) == 2]
    except Exception:  # noqa: BLE001 - a corrupt file is reported by the full read that follows
        return
    for shape in shapes:
        check_size(max(shape), n_sig, max_samples, where)


def _fast_read(hea: Path, h: WfdbHeader, max_samples: int | None) -> tuple[np.ndarray, int]:
    parts = [(idx, _read_group(hea, h, idx, h.sig_len, max_samples)) for _name, idx in _groups(h.signals)]
    lengths = {p[1].shape[1] for p in parts}
    if len(lengths) > 1:
        raise RejectedRecord("size_mismatch", f"{hea.name}: signal files hold different lengths {sorted(lengths)}")
    n = lengths.pop()
    if len(parts) == 1 and parts[0][0] == list(range(h.n_sig)):
        digital = parts[0][1]  # may be a transposed view of the file's int16 frames
    else:
        digital = np.empty((h.n_sig, n), dtype=np.result_type(*[p[1].dtype for p in parts]))
        for idx, d in parts:
            digital[idx] = d
    return digital, n


def _check_fallback_files(hea: Path, h: WfdbHeader, max_samples: int | None) -> None:
    """What wfdb-python would read, checked before it reads: each signal file inside the record's folder, the
    declared size under ``max_samples``, and (uncompressed single-format files) the file size against the header:
    a skewed signal may read up to its skew past the end (wfdb-python pads it), nothing else may be over or short.
    """
    spf = max((s.samps_per_frame for s in h.signals), default=1)
    if h.sig_len is not None:
        check_size(h.sig_len * spf, h.n_sig, max_samples, f"{hea.name} line {h.fs_line}")
    for name, idx in _groups(h.signals):
        sigs = [h.signals[i] for i in idx]
        where = f"{hea.name} line {sigs[0].line}"
        if name == "~" or sigs[0].fmt == "0":
            continue
        path = _signal_path(hea, name, where)
        fmts = {s.fmt for s in sigs}
        if len(fmts) > 1 or fmts & _COMPRESSED:
            continue  # FLAC is compressed; mixed-format frames: wfdb-python checks what it reads
        fmt = fmts.pop()
        per_frame = sum(s.samps_per_frame for s in sigs)
        avail = max(path.stat().st_size - sigs[0].byte_offset, 0)
        if h.sig_len is None:
            check_size(int(avail // (_BYTES_PER_SAMPLE[fmt] * per_frame)) * spf, h.n_sig, max_samples, where)
            continue
        need = _n_bytes(fmt, h.sig_len * per_frame)
        most = _n_bytes(fmt, (h.sig_len + max(s.skew for s in sigs)) * per_frame)
        if not need <= avail <= most:
            raise RejectedRecord("size_mismatch", f"{path.name} holds {avail} bytes but {hea.name} implies {need} "
                                                  f"({h.sig_len} frames of {per_frame} samples in format {fmt})")


def _check_segments(hea: Path, h: WfdbHeader, max_samples: int | None) -> None:
    """A multi-segment master: its segment headers inside its folder, its total length under ``max_samples``,
    and at least one segment that holds samples."""
    where = f"{hea.name} line {h.fs_line}"
    if h.sig_len is not None:
        check_size(h.sig_len, h.n_sig, max_samples, where)
    for name, _length in h.segments:
        if name == "~":
            continue
        seg = _signal_path(hea, name + ".hea", where, "segment header")
        try:
            seg_h = parse_header(_header_text(seg))
        except (OSError, HeaderError) as e:
            raise RejectedRecord("unreadable", f"{where}: segment header {seg.name}: {e}") from None
        try:  # its signal files: inside the folder, of the size it declares
            _check_fallback_files(seg, seg_h, None)
        except RejectedRecord as e:
            raise RejectedRecord(e.reason, f"{hea.name}: segment {e.detail}") from None
    if not any(name != "~" and length > 0 for name, length in h.segments):
        raise RejectedRecord("empty", f"{where}: every one of the {len(h.segments)} segments is empty (~ or a "
                                      f"layout segment): the record holds no samples")


def _layout_units(hea: Path, h: WfdbHeader) -> dict[str, str]:
    """Units by signal name from a variable-layout master's layout segment (its first, 0 samples long)."""
    if not h.segments or h.segments[0][1] != 0 or h.segments[0][0] == "~":
        return {}
    try:
        layout = parse_header(_header_text(hea.parent / (h.segments[0][0] + ".hea")))
    except (OSError, HeaderError):
        return {}
    return {s.name: s.units for s in layout.signals}


def _wfdb_fallback(hea: Path, h: WfdbHeader, store_digital: bool,
                   ) -> tuple[np.ndarray, np.ndarray | None, list[str], list[str] | None]:
    """(signal, digital or None, lead names, units) as wfdb-python reads them."""
    import wfdb

    base = str(hea.with_suffix(""))
    try:
        rec = wfdb.rdrecord(base)
        sig = np.asarray(rec.p_signal, dtype=np.float64).T.astype(np.float32)
        dig = None
        if store_digital and h.n_seg is None and all(s.samps_per_frame == 1 for s in h.signals):
            drec = wfdb.rdrecord(base, physical=False)
            dig = np.ascontiguousarray(np.asarray(drec.d_signal).T, dtype=np.int32)
    except FileNotFoundError as e:
        raise RejectedRecord("missing_data", f"{hea.name}: {e}") from None
    except Exception as e:  # noqa: BLE001 - wfdb raises many types for corrupt records
        raise RejectedRecord("unreadable", f"{hea.name}: wfdb-python: {type(e).__name__}: {e}") from None
    leads = [str(n) for n in (rec.sig_name or [])]
    units = list(rec.units) if rec.units is not None else [None] * len(leads)
    if any(u is None for u in units):  # a variable-layout record: wfdb-python leaves the units out
        known = _layout_units(hea, h)
        units = [u if u is not None else known.get(n, "") for n, u in zip(leads, units, strict=True)]
    return np.ascontiguousarray(sig), dig, leads, [str(u) for u in units]


def _header_text(hea: Path) -> str:
    """A header's text: UTF-8 (record and file names may be non-ASCII), else Latin-1 (which never fails)."""
    data = hea.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def read_wfdb(hea: Path, record_id: str, store_digital: bool = False, force_fallback: bool = False,
              max_samples: int | None = None) -> RawRecord:
    """Read one WFDB record from its header path. Raises :class:`RejectedRecord`.

    max_samples: the most samples per lead a record may declare (``too_large`` otherwise, checked before any
    signal data is read); None for no bound.
    """
    try:
        if not stat.S_ISREG(os.stat(hea).st_mode):  # a FIFO named x.hea would block the read forever
            raise RejectedRecord("not_regular_file", f"{hea.name}: not a regular file (a FIFO or device); not opened")
        text = _header_text(hea)
    except OSError as e:
        raise RejectedRecord("unreadable", f"{hea.name}: {e.strerror or e}") from None
    try:
        h = parse_header(text)
    except HeaderError as e:
        raise RejectedRecord("unreadable", f"{hea.name} {e}") from None
    check_sample_rate(h.fs, f"{hea.name} line {h.fs_line}")
    if h.n_sig == 0 or h.sig_len == 0:
        raise RejectedRecord("empty", f"{hea.name} line {h.fs_line}: "
                                      + ("no signals" if h.n_sig == 0 else "signal length 0"))
    for s in h.signals:
        if s.fmt not in WFDB_FORMATS:
            raise RejectedRecord("bad_format", f"{hea.name} line {s.line}: signal format {s.fmt} is not a WFDB "
                                               f"format (known: {', '.join(sorted(WFDB_FORMATS, key=int))})")
    leads = [s.name for s in h.signals]
    units: list[str] | None = [s.units for s in h.signals]
    if h.n_seg is None:
        check_leads(leads, hea.name)
    reason = "forced" if force_fallback else _needs_fallback(h)
    source_format = "wfdb"
    if reason is None:
        digital, n = _fast_read(hea, h, max_samples)
        if n == 0:
            raise RejectedRecord("empty", f"{hea.name}: the signal file holds no samples")
        gain = np.array([s.gain for s in h.signals], dtype=np.float64)
        baseline = np.array([s.baseline for s in h.signals], dtype=np.float64)
        with np.errstate(over="ignore"):  # a tiny gain overflows float32 to inf: flagged per lead at ingest
            signal = physical(digital, gain, baseline, [_INVALID[s.fmt] for s in h.signals])
        if any(s.file_name.lower().endswith(".mat") for s in h.signals):
            source_format = "wfdb-mat"
    else:
        if h.n_seg is not None:
            _check_segments(hea, h, max_samples)
        else:
            _check_fallback_files(hea, h, max_samples)
        signal, digital, wf_leads, wf_units = _wfdb_fallback(hea, h, store_digital)
        if not leads or h.n_seg is not None:
            leads, units = wf_leads, wf_units
            check_leads(leads, hea.name)
        if signal.shape[1] == 0:
            raise RejectedRecord("empty", f"{hea.name}: no samples")
    fmts = sorted({s.fmt for s in h.signals})
    gains = sorted({f"{s.gain:g}" for s in h.signals})
    check_amplitude(signal, leads, units, hea.name,
                    hint=f" (header gain {'/'.join(gains[:3])}, format {'/'.join(fmts)}: one of them is wrong?)"
                    if h.signals else "")
    meta = parse_comments(h.comments)
    patient_id, study_id = meta.patient_id, meta.study_id
    if patient_id is None or study_id is None:
        p, s = mimic_ids(hea)
        patient_id, study_id = patient_id or p, study_id or s
    rec = RawRecord(
        record_id=record_id,
        source_path=os.path.abspath(hea),
        source_format=source_format,
        sample_rate=float(h.fs),
        leads=leads,
        signal=signal,
        units=units,
        patient_id=patient_id,
        study_id=study_id,
        age=meta.age,
        sex=meta.sex,
        dx_codes=meta.dx_codes,
        comments=meta.comments,
        base_datetime=h.base_datetime,
    )
    if store_digital and digital is not None:
        rec.digital = np.ascontiguousarray(digital, dtype=np.int32)
        rec.gain = [float(s.gain) for s in h.signals]
        rec.baseline = [int(s.baseline) for s in h.signals]
    return rec
