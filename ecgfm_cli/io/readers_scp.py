"""SCP-ECG (EN 1064 / ISO 11073-91064) reader.

A file is a 6-byte record header (CRC-CCITT of the rest, record length) and sections, each with a 16-byte
header (CRC, id, length, version, protocol, reserved). Section 0 points at the others (1-based byte index).
Read here: 1 (patient/acquisition tags: identifiers go to ``RawRecord.identifiers``), 2 (Huffman tables, or the
standard's default table), 3 (leads: id codes, sample ranges, reference-beat-subtraction flag), 4 (QRS
subtraction zones), 5 (reference beat), 6 (rhythm data: amplitude multiplier in nV, sample interval in us,
first/second differences) and 8 (interpretation statements, scrubbed of people's names).

Decoding: Huffman (table-driven: every bit position's code is looked up at once with numpy, then one pass
over the symbols), undo differences (cumulative sums), then add the decoded reference beat back inside each
subtraction zone, aligned on its fiducial, when section 3 says the reference beat was subtracted. Values are
``int * AVM`` nV, returned in mV. Bimodal (decimated) rhythm data are rejected with that reason.
"""

from __future__ import annotations

import binascii
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecgfm_cli.contract import canonical_lead
from ecgfm_cli.io.derive import derive_limb_leads
from ecgfm_cli.io.readers_common import check_leads, check_sample_rate, check_size
from ecgfm_cli.io.record import RawRecord, RejectedRecord

#: lead identification codes of section 3 (EN 1064 table 'lead identification'); "d" = derived by the cart
LEAD_CODES = (
    "unspecified", "I", "II", "V1", "V2", "V3", "V4", "V5", "V6", "V7", "V2R", "V3R", "V4R", "V5R", "V6R", "V7R",
    "X", "Y", "Z", "CC5", "CM5", "LA", "RA", "LL", "fI", "fE", "fC", "fA", "fM", "fF", "fH", "dI", "dII", "dV1",
    "dV2", "dV3", "dV4", "dV5", "dV6", "dV7", "dV2R", "dV3R", "dV4R", "dV5R", "dV6R", "dV7R", "dX", "dY", "dZ",
    "dCC5", "dCM5", "dLA", "dRA", "dLL", "dfI", "dfE", "dfC", "dfA", "dfM", "dfF", "dfH", "III", "aVR", "aVL",
    "aVF", "-aVR", "V8", "V9", "V8R", "V9R", "D", "A", "J", "Defib", "Extern", "A1", "A2", "A3", "A4", "dV8",
    "dV9", "dV8R", "dV9R", "dD", "dA", "dJ", "Chest", "V", "VR", "VL", "VF", "MCL", "MCL1", "MCL2", "MCL3",
    "MCL4", "MCL5", "MCL6", "CC", "CC1", "CC2", "CC3", "CC4", "CC6", "CC7", "CM", "CM1", "CM2", "CM3", "CM4",
    "CM6", "dIII", "daVR", "daVL", "daVF", "d-aVR", "dChest", "dV", "dVR", "dVL", "dVF",
)

#: the standard's default Huffman table: (bits in prefix, bits in whole code, mode switch, base value, base code
#: as stored, i.e. bit-reversed). The last two are escapes: the 8 / 16 bits after the prefix are the value.
DEFAULT_TABLE = (
    (1, 1, 1, 0, 0), (3, 3, 1, 1, 1), (3, 3, 1, -1, 5), (4, 4, 1, 2, 3), (4, 4, 1, -2, 11), (5, 5, 1, 3, 7),
    (5, 5, 1, -3, 23), (6, 6, 1, 4, 15), (6, 6, 1, -4, 47), (7, 7, 1, 5, 31), (7, 7, 1, -5, 95),
    (8, 8, 1, 6, 63), (8, 8, 1, -6, 191), (9, 9, 1, 7, 127), (9, 9, 1, -7, 383), (10, 10, 1, 8, 255),
    (10, 10, 1, -8, 767), (10, 18, 1, 0, 511), (10, 26, 1, 0, 1023),
)
DEFAULT_TABLE_MARK = 19999
_MAX_PREFIX = 20  # longest prefix accepted in a file's own table (the look-up table has 2**prefix entries)
_MAX_EXTRA = 32
_SEX = {1: "M", 2: "F"}
_AGE_UNIT_YEARS = {1: 1.0, 2: 1 / 12, 3: 7 / 365.25, 4: 1 / 365.25, 5: 1 / 8766}


def _bad(where: str, what: str) -> RejectedRecord:
    return RejectedRecord("unreadable", f"{where}: {what}")


def crc_ccitt(data: bytes) -> int:
    """CRC-CCITT (polynomial 0x1021, initial 0xFFFF, not reflected) as SCP-ECG uses it."""
    return binascii.crc_hqx(data, 0xFFFF)


@dataclass
class _Lead:
    code: int
    start: int  # 1-based first sample
    end: int  # 1-based last sample

    @property
    def name(self) -> str:
        return LEAD_CODES[self.code] if self.code < len(LEAD_CODES) else f"lead{self.code}"


def split_sections(buf: bytes, where: str) -> dict[int, bytes]:
    """Check the record and section CRCs and lengths; return {section id: section body (after its 16-byte
    header)}. Raises ``unreadable`` on any inconsistency (truncation, bad pointer, CRC mismatch)."""
    if len(buf) < 6 + 16:
        raise _bad(where, f"{len(buf)} bytes is too short for an SCP-ECG record")
    crc, size = struct.unpack_from("<HI", buf, 0)
    if size > len(buf):
        raise _bad(where, f"truncated: the header declares {size:,} bytes, the file has {len(buf):,}")
    if size < 6 + 16:
        raise _bad(where, f"record length {size} is too small")
    if crc_ccitt(buf[2:size]) != crc:
        raise _bad(where, "record CRC mismatch (the file is corrupt)")
    sections: dict[int, bytes] = {}
    s0 = _section_at(buf, 6, size, 0, where)
    for off in range(0, len(s0) - 9, 10):
        sid, length, index = struct.unpack_from("<HII", s0, off)
        if length == 0 or sid == 0:
            continue
        start = index - 1
        if index < 1 or start + length > size or length < 16:
            raise _bad(where, f"section {sid}: pointer (byte {index}, {length} bytes) outside the record")
        if sid in sections:
            raise _bad(where, f"section {sid} is listed twice")
        sections[sid] = _section_at(buf, start, size, sid, where, length)
    return sections


def _section_at(buf: bytes, start: int, size: int, sid: int, where: str, length: int | None = None) -> bytes:
    if start + 16 > size:
        raise _bad(where, f"section {sid}: header outside the record")
    crc, got_id, got_len = struct.unpack_from("<HHI", buf, start)
    if got_id != sid:
        raise _bad(where, f"section {sid}: the pointer leads to section {got_id}")
    if length is not None and got_len != length:
        raise _bad(where, f"section {sid}: length {got_len} differs from section 0's {length}")
    if got_len < 16 or start + got_len > size:
        raise _bad(where, f"section {sid}: length {got_len} outside the record")
    if crc_ccitt(buf[start + 2:start + got_len]) != crc:
        raise _bad(where, f"section {sid}: CRC mismatch (the file is corrupt)")
    return buf[start + 16:start + got_len]


# ---------------------------------------------------------------- Huffman


def _reverse_bits(v: int, n: int) -> int:
    return int(format(v & ((1 << n) - 1), f"0{n}b")[::-1], 2) if n else 0


def parse_huffman(body: bytes | None, where: str) -> list[tuple] | None:
    """Section 2 -> list of tables (each a tuple of code structures, see DEFAULT_TABLE), or None when the file has
    no section 2 (data stored as 16-bit integers)."""
    if body is None:
        return None
    if len(body) < 2:
        raise _bad(where, "section 2 is empty")
    (n_tables,) = struct.unpack_from("<H", body, 0)
    if n_tables == DEFAULT_TABLE_MARK:
        return [DEFAULT_TABLE]
    tables, off = [], 2
    for t in range(n_tables):
        if off + 2 > len(body):
            raise _bad(where, f"section 2: table {t + 1} of {n_tables} is cut off")
        (n_codes,) = struct.unpack_from("<H", body, off)
        off += 2
        if off + 9 * n_codes > len(body):
            raise _bad(where, f"section 2: table {t + 1} declares {n_codes} codes beyond the section")
        codes = []
        for _ in range(n_codes):
            prefix, total, mode, base, code = struct.unpack_from("<BBBhI", body, off)
            off += 9
            if not 1 <= prefix <= _MAX_PREFIX or not prefix <= total <= prefix + _MAX_EXTRA:
                raise _bad(where, f"section 2: a code of {prefix} prefix / {total} total bits is not supported")
            codes.append((prefix, total, mode, base, code))
        tables.append(tuple(codes))
    if not tables:
        raise _bad(where, "section 2 holds no Huffman table")
    return tables


class _Table:
    """Look-up arrays indexed by the next ``width`` bits of the stream (``width`` = the longest prefix): the
    length, value, number of escape bits after the prefix and the mode switch of the code starting there."""

    def __init__(self, codes: tuple, where: str):
        self.width = max(c[0] for c in codes)
        self.extra = max(c[1] - c[0] for c in codes)
        size = 1 << self.width
        self.total = np.ones(size, dtype=np.int64)  # an invalid window: 1 bit, flagged by its value
        self.value = np.full(size, _INVALID, dtype=np.int64)
        self.prefix = np.zeros(size, dtype=np.int64)
        self.n_extra = np.zeros(size, dtype=np.int64)
        self.switch = np.zeros(size, dtype=bool)
        seen = np.zeros(size, dtype=bool)
        for prefix, total, mode, base, code in codes:
            msb_first = _reverse_bits(code, prefix)
            lo, hi = msb_first << (self.width - prefix), (msb_first + 1) << (self.width - prefix)
            if seen[lo:hi].any():
                raise _bad(where, "section 2: a Huffman table whose codes are not prefix-free")
            seen[lo:hi] = True
            self.total[lo:hi], self.value[lo:hi], self.prefix[lo:hi] = total, base, prefix
            self.n_extra[lo:hi], self.switch[lo:hi] = total - prefix, mode == 0


_INVALID = 1 << 40
_BATCH_BITS = 1 << 22  # leads decoded together up to this many bits (~32 MB per per-bit array)


def _codes_at(data: bytes, bits: np.ndarray, n_pos: int, t: _Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every bit position of ``data``, the code of table ``t`` that would start there: (length in bits, value,
    is a table switch); an invalid code gets value _INVALID and length 1; the position past the end is invalid.

    The next ``t.width`` bits at every position come from 32-bit big-endian words (one per byte); escape values
    (the bits after an escape prefix, a small share of the codes) are read bit by bit at those positions only.
    bits: the stream unpacked, one int per bit, zero-padded by at least 40 bits.
    """
    b = np.frombuffer(data + b"\0" * 4, dtype=np.uint8).astype(np.int64)
    words = (b[:-3] << 24) | (b[1:-2] << 16) | (b[2:-1] << 8) | b[3:]
    pos = np.arange(n_pos, dtype=np.int64)
    win = (words[pos >> 3] >> (32 - t.width - (pos & 7))) & ((1 << t.width) - 1)
    total, val = t.total[win], t.value[win]
    if t.extra:
        esc = np.flatnonzero(t.n_extra[win])
        if len(esc):
            n_extra = t.n_extra[win[esc]]
            at = esc + t.prefix[win[esc]]
            raw = np.zeros(len(esc), dtype=np.int64)
            for i in range(t.extra):
                raw = np.where(i < n_extra, (raw << 1) | bits[np.minimum(at + i, len(bits) - 1)], raw)
            sign = np.left_shift(1, n_extra - 1)
            val[esc] = np.where(raw & sign, raw - (sign << 1), raw)
    val[-1] = _INVALID
    return total, val, t.switch[win]


def huffman_decode(data: bytes, n: int, tables: list[tuple], where: str) -> np.ndarray:
    """Decode ``n`` values from one lead's Huffman bit stream (MSB first). Returns (n,) int64."""
    return huffman_decode_leads([data], [n], tables, where)[0]


def huffman_decode_leads(chunks: list[bytes], counts: list[int], tables: list[tuple], where: str,
                         first: int = 0) -> list[np.ndarray]:
    """Decode each lead's bit stream (``counts[i]`` values from ``chunks[i]``). Returns [(counts[i],) int64].

    The leads' streams are concatenated; every bit position's code (length, value) is computed at once with
    numpy, then each lead's chain of code starts is followed with vectorised pointer jumping (:func:`_hop`).
    A mode-switch code selects another table (1-based) and emits no value: such files take a serial path.
    """
    lens = [8 * len(c) for c in chunks]
    for i, (n, n_bits) in enumerate(zip(counts, lens, strict=True)):
        if n > n_bits:  # every code is at least 1 bit: refuse before allocating per-sample arrays
            raise _bad(f"{where} lead {first + i + 1}", f"{n:,} samples declared, {n_bits:,} bits of data")
    if len(chunks) > 1 and sum(lens) > _BATCH_BITS:  # bound the per-bit arrays (8 bytes per bit each)
        out, i = [], 0
        while i < len(chunks):
            j, bits_in = i + 1, lens[i]
            while j < len(chunks) and bits_in + lens[j] <= _BATCH_BITS:
                bits_in += lens[j]
                j += 1
            out += huffman_decode_leads(chunks[i:j], counts[i:j], tables, where, first=first + i)
            i = j
        return out
    built = [_Table(codes, where) for codes in tables]
    offs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    n_pos = int(offs[-1]) + 1
    data = b"".join(chunks)
    bits = np.unpackbits(np.frombuffer(data + b"\0" * 5, dtype=np.uint8)).astype(np.int64)
    coded = [_codes_at(data, bits, n_pos, t) for t in built]
    out = []
    if len(built) == 1 and not coded[0][2].any():
        step, val, _ = coded[0]
        nxt = np.minimum(np.arange(n_pos) + step, n_pos - 1)
        for i, pos in enumerate(_hop(nxt, offs[:-1], counts)):
            w, end, n = f"{where} lead {first + i + 1}", int(offs[i + 1]), counts[i]
            past = pos >= end
            if past.any():
                raise _bad(w, f"lead data end after {int(np.argmax(past)):,} of {n:,} samples")
            if n and pos[-1] + step[pos[-1]] > end:
                raise _bad(w, f"lead data end inside the code of sample {n:,}")
            out.append(val[pos])
    else:
        for i, n in enumerate(counts):
            arr, _end = _decode_switching(coded, int(offs[i]), int(offs[i + 1]), n, f"{where} lead {first + i + 1}")
            out.append(arr)
    for i, arr in enumerate(out):
        bad = arr == _INVALID
        if bad.any():
            raise _bad(f"{where} lead {first + i + 1}", f"invalid Huffman code at sample {int(np.argmax(bad)) + 1:,}")
    return out


def _hop(nxt: np.ndarray, starts: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    """For each start s and count n: the n positions s, nxt[s], nxt[nxt[s]], ... (where successive codes start),
    vectorised: jumps of ``b`` codes by repeated squaring of ``nxt``, a short walk over the block starts (all
    leads at once), then every block filled in parallel, one code per step. ``nxt``'s last position maps to
    itself."""
    n_max = max(counts, default=0)
    if n_max == 0:
        return [np.zeros(0, dtype=np.int64) for _ in counts]
    b = 1 << max(1, (max(n_max, 2) - 1).bit_length() // 2)  # ~ sqrt(n), a power of two
    jump = nxt
    for _ in range(b.bit_length() - 1):
        jump = jump[jump]
    n_blocks = -(-n_max // b)
    block_starts = np.empty((len(counts), n_blocks), dtype=np.int64)
    p = np.asarray(starts, dtype=np.int64)
    for k in range(n_blocks):
        block_starts[:, k] = p
        p = jump[p]
    grid = np.empty((len(counts) * n_blocks, b), dtype=np.int64)
    grid[:, 0] = block_starts.reshape(-1)
    for j in range(1, b):
        grid[:, j] = nxt[grid[:, j - 1]]
    grid = grid.reshape(len(counts), n_blocks * b)
    return [grid[i, :n] for i, n in enumerate(counts)]


def _decode_switching(coded, start: int, end: int, n: int, where: str) -> tuple[np.ndarray, int]:
    """The serial decoder for tables that switch (mode-switch codes): one code at a time, bits start..end."""
    steps = [c[0][start:end + 1].tolist() for c in coded]
    values = [c[1][start:end + 1].tolist() for c in coded]
    switches = [c[2][start:end + 1].tolist() for c in coded]
    last = end - start
    out = [0] * n
    p = t = i = 0
    while i < n:
        if p >= last:
            raise _bad(where, f"lead data end after {i:,} of {n:,} samples")
        if switches[t][p]:
            nxt = values[t][p]
            if not 1 <= nxt <= len(steps):
                raise _bad(where, f"Huffman code switches to table {nxt}, the file has {len(steps)}")
            p += steps[t][p]
            t = nxt - 1
            continue
        out[i] = values[t][p]
        p += steps[t][p]
        i += 1
    if p > last:
        raise _bad(where, f"lead data end inside the code of sample {n:,}")
    return np.array(out, dtype=np.int64), p


def undo_differences(d: np.ndarray, order: int) -> np.ndarray:
    """Invert SCP's difference encoding. d: (n,) int64 decoded values; order 0 (none), 1 (x[n] = x[n-1] + d[n])
    or 2 (x[n] = d[n] + 2 x[n-1] - x[n-2], the first two values stored as they are)."""
    if order == 0 or len(d) == 0:
        return d
    if order == 1:
        return np.cumsum(d)
    if len(d) < 2:
        return d.copy()
    slope = np.concatenate([[0], np.cumsum(np.concatenate([[d[1] - d[0]], d[2:]]))])
    return d[0] + np.cumsum(slope)


# ---------------------------------------------------------------- sections


def _leads(body: bytes | None, where: str) -> tuple[list[_Lead], bool]:
    if body is None:
        raise RejectedRecord("not_ecg", f"{where}: SCP-ECG record without section 3 (lead definition)")
    if len(body) < 2:
        raise _bad(where, "section 3 is cut off")
    n, flags = body[0], body[1]
    if n == 0:
        raise RejectedRecord("empty", f"{where}: section 3 declares 0 leads")
    if 2 + 9 * n > len(body):
        raise _bad(where, f"section 3 declares {n} leads beyond its length")
    leads = []
    for i in range(n):
        start, end, code = struct.unpack_from("<IIB", body, 2 + 9 * i)
        if start < 1 or end < start:
            raise _bad(where, f"section 3: lead {i + 1} spans samples {start}..{end}")
        leads.append(_Lead(code, start, end))
    return leads, bool(flags & 1)


def _data_section(body: bytes | None, sid: int, n_leads: int, where: str) -> tuple[int, int, int, int, list[bytes]]:
    """Section 5 or 6 -> (AVM nV, sample interval us, difference order, byte 6 flag, per-lead byte strings)."""
    if body is None:
        raise RejectedRecord("not_ecg", f"{where}: SCP-ECG record without section {sid}")
    if len(body) < 6 + 2 * n_leads:
        raise _bad(where, f"section {sid} is cut off")
    avm, interval, diff, flag = struct.unpack_from("<HHBB", body, 0)
    lengths = struct.unpack_from(f"<{n_leads}H", body, 6)
    off = 6 + 2 * n_leads
    if off + sum(lengths) > len(body):
        raise _bad(where, f"section {sid}: lead data ({sum(lengths):,} bytes) run past the section")
    chunks = []
    for ln in lengths:
        chunks.append(body[off:off + ln])
        off += ln
    if diff not in (0, 1, 2):
        raise _bad(where, f"section {sid}: unknown difference encoding {diff}")
    return avm, interval, diff, flag, chunks


def _decode_leads(chunks: list[bytes], counts: list[int], diff: int, tables: list[tuple] | None,
                  where: str) -> list[np.ndarray]:
    if tables is None:  # no section 2: 16-bit little-endian integers
        raw = []
        for i, (chunk, n) in enumerate(zip(chunks, counts, strict=True)):
            if len(chunk) < 2 * n:
                raise _bad(f"{where} lead {i + 1}", f"{len(chunk)} bytes hold fewer than {n:,} 16-bit samples")
            raw.append(np.frombuffer(chunk, dtype="<i2", count=n).astype(np.int64))
    else:
        raw = huffman_decode_leads(chunks, counts, tables, where)
    return [undo_differences(d, diff) for d in raw]


def _zones(body: bytes | None, where: str) -> tuple[int, list[tuple[int, int, int]]]:
    """Section 4 -> (fiducial sample of the reference beat, [(start, fiducial, end) of each subtraction zone])."""
    if body is None or len(body) < 6:
        raise _bad(where, "reference beat subtraction is flagged but section 4 (QRS locations) is missing")
    _len_ms, fcm, n_qrs = struct.unpack_from("<HHH", body, 0)
    if 6 + 14 * n_qrs > len(body):
        raise _bad(where, f"section 4 declares {n_qrs} QRS complexes beyond its length")
    zones = []
    for q in range(n_qrs):
        _typ, sb, fc, se = struct.unpack_from("<HIII", body, 6 + 14 * q)
        if sb and se:
            zones.append((sb, fc, se))
    return fcm, zones


def _add_reference_beat(residual: np.ndarray, ref: np.ndarray, fcm: int, zones, where: str) -> np.ndarray:
    """Add the reference beat back inside each zone: sample s (1-based) gets ref[s - fc + fcm] (1-based)."""
    x = residual.copy()
    for sb, fc, se in zones:
        lo, hi = sb, min(se, len(x))
        if lo > hi:
            continue
        r0 = lo - fc + fcm - 1
        r1 = hi - fc + fcm - 1
        if r0 < 0 or r1 >= len(ref):
            raise _bad(where, f"subtraction zone {sb}..{se} (fiducial {fc}) falls outside the reference beat")
        x[lo - 1:hi] += ref[r0:r1 + 1]
    return x


def sample_rate_from_interval(interval_us: int) -> float | None:
    """Hz from SCP's whole-microsecond sample interval: the whole-Hz rate whose interval rounds to it (1667 us ->
    600 Hz, not 599.88), else 1e6 / interval. None for 0."""
    if not interval_us:
        return None
    whole = round(1e6 / interval_us)
    return float(whole) if whole and round(1e6 / whole) == interval_us else 1e6 / interval_us


def _text(v: bytes) -> str:
    return v.split(b"\x00", 1)[0].decode("latin-1").strip()


def _patient(body: bytes | None, rec: dict) -> None:
    """Section 1 tags -> identifiers, age, sex, acquisition date/time, device (into ``rec``)."""
    if not body:
        return
    ids: dict[str, str] = rec["identifiers"]
    names, persons, other = [], [], []
    date = time = None
    off = 0
    while off + 3 <= len(body):
        tag, ln = body[off], struct.unpack_from("<H", body, off + 1)[0]
        v = body[off + 3:off + 3 + ln]
        off += 3 + ln
        if tag == 255:
            break
        if tag in (0, 1, 3) and _text(v):
            names.append(_text(v))
        elif tag == 2 and _text(v):
            ids["mrn"] = _text(v)
        elif tag == 4 and len(v) >= 3:
            age, unit = struct.unpack_from("<HB", v, 0)
            if age and unit in _AGE_UNIT_YEARS:
                rec["age"] = round(age * _AGE_UNIT_YEARS[unit], 3)
        elif tag == 5 and len(v) >= 4:
            y, m, d = struct.unpack_from("<HBB", v, 0)
            if y and 1 <= m <= 12 and 1 <= d <= 31:
                ids["birth_date"] = f"{y:04d}-{m:02d}-{d:02d}"
        elif tag == 8 and len(v) >= 1:
            rec["sex"] = _SEX.get(v[0])
        elif tag in (20, 21, 22) and _text(v):
            persons.append(_text(v))
        elif tag in (13, 16, 17, 18, 19, 23, 30, 31, 35) and _text(v):
            other.append(_text(v))
        elif tag == 14 and len(v) > 36:
            device = [s.decode("latin-1") for s in v[36:].split(b"\x00") if s.strip()]
            if device:
                rec["comments"]["device"] = " ".join(device)
        elif tag == 25 and len(v) >= 4:
            date = struct.unpack_from("<HBB", v, 0)
        elif tag == 26 and len(v) >= 3:
            time = tuple(v[:3])
    if names:
        ids["name"] = " ".join(names)
    if persons:
        ids["persons"] = "; ".join(persons)
    if other:
        ids["other"] = "; ".join(other)
    if date and date[0] and 1 <= date[1] <= 12 and 1 <= date[2] <= 31:
        stamp = f"{date[0]:04d}-{date[1]:02d}-{date[2]:02d}"
        if time and time[0] < 24 and time[1] < 60 and time[2] < 61:
            stamp += f" {time[0]:02d}:{time[1]:02d}:{time[2]:02d}"
        rec["base_datetime"] = stamp


def _statements(body: bytes | None) -> list[str]:
    """Section 8 (textual interpretation): the statements, in order."""
    if not body or len(body) < 9:
        return []
    n = body[8]
    out, off = [], 9
    for _ in range(n):
        if off + 3 > len(body):
            break
        ln = struct.unpack_from("<H", body, off + 1)[0]
        text = _text(body[off + 3:off + 3 + ln])
        off += 3 + ln
        if text:
            out.append(text)
    return out


def scrub_into(lines: list[str], ids: dict[str, str]) -> list[str]:
    """Free-text lines with people's names, dates and ids scrubbed (deid.scrub_statements, given the record's
    own names and MRN); what was dropped or changed is appended to ``ids["other"]`` (kept only by
    --keep-identifiers)."""
    from ecgfm_cli.deid import scrub_statements

    known = [v for k in ("name", "mrn") if (v := ids.get(k))]
    known += [part for k in ("name",) for part in ids.get(k, "").split() if len(part) > 2]
    kept, removed = scrub_statements(lines, known)
    if removed:
        ids["other"] = "; ".join(x for x in (ids.get("other"), *removed) if x)
    return kept


def read_scp(path: Path, record_id: str, opts) -> Iterator[RawRecord]:
    """One SCP-ECG file -> one RawRecord (rhythm data, mV). See the module docstring for the decoding."""
    where = path.name
    max_samples = getattr(opts, "max_samples", 2**24)
    buf = path.read_bytes()
    sec = split_sections(buf, where)
    leads, subtracted = _leads(sec.get(3), where)
    n_total = max(ld.end for ld in leads)
    check_size(n_total, len(leads), max_samples, where)
    tables = parse_huffman(sec.get(2), where)
    avm, interval, diff, bimodal, chunks = _data_section(sec.get(6), 6, len(leads), where)
    if bimodal:
        raise RejectedRecord("not_ecg", f"{where}: SCP-ECG bimodal compression (decimated rhythm data) is not "
                                        f"supported")
    if avm == 0:
        raise _bad(where, "section 6: amplitude value multiplier 0")
    fs = check_sample_rate(sample_rate_from_interval(interval), where)
    counts = [ld.end - ld.start + 1 for ld in leads]
    rhythm = _decode_leads(chunks, counts, diff, tables, f"{where} section 6")
    if subtracted:
        ravm, rinterval, rdiff, _, rchunks = _data_section(sec.get(5), 5, len(leads), where)
        if rinterval != interval or ravm != avm:
            raise RejectedRecord("not_ecg", f"{where}: reference beat at {rinterval} us / {ravm} nV but rhythm at "
                                            f"{interval} us / {avm} nV (decimated SCP-ECG is not supported)")
        length_ms = struct.unpack_from("<H", sec[4], 0)[0] if len(sec.get(4, b"")) >= 2 else 0
        n_ref = length_ms * 1000 // rinterval
        if n_ref <= 0:
            raise _bad(where, "section 4 gives a reference beat of 0 ms")
        check_size(n_ref, len(leads), max_samples, where)
        ref = _decode_leads(rchunks, [n_ref] * len(leads), rdiff, tables, f"{where} section 5")
        fcm, zones = _zones(sec.get(4), where)
        rhythm = [_add_reference_beat(x, r, fcm, zones, where) for x, r in zip(rhythm, ref, strict=True)]
    digital = np.zeros((len(leads), n_total), dtype=np.int64)
    present = np.zeros((len(leads), n_total), dtype=bool)
    for i, (ld, x) in enumerate(zip(leads, rhythm, strict=True)):
        digital[i, ld.start - 1:ld.end] = x
        present[i, ld.start - 1:ld.end] = True
    names = [ld.name for ld in leads]
    rec: dict = {"identifiers": {}, "comments": {}, "age": None, "sex": None, "base_datetime": None}
    _patient(sec.get(1), rec)
    names, digital, derived = derive_limb_leads(names, digital)
    if derived:  # every lead now in half-counts
        avm /= 2
        canon = [canonical_lead(n) for n in names]
        both = present[canon.index("I")] & present[canon.index("II")]
        present = np.concatenate([present, np.broadcast_to(both, (len(derived), n_total))])
        rec["comments"]["derived_leads"] = ",".join(derived)
    signal = (digital * (avm * 1e-6)).astype(np.float32)
    signal[~present] = np.nan
    check_leads(names, where)
    store = bool(getattr(opts, "store_digital", False)) and present.all() and np.abs(digital).max(initial=0) < 2**31
    yield RawRecord(
        record_id=record_id, source_path=os.path.abspath(path), source_format="scp-ecg", sample_rate=fs,
        leads=names, signal=signal, units=["mV"] * len(names),
        digital=digital.astype(np.int32) if store else None,
        gain=[1e6 / avm] * len(names) if store else None, baseline=[0] * len(names) if store else None,
        age=rec["age"], sex=rec["sex"], base_datetime=rec["base_datetime"], comments=rec["comments"],
        dx_codes=scrub_into(_statements(sec.get(8)), rec["identifiers"]), identifiers=rec["identifiers"])
