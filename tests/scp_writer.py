"""Test-only writers of SCP-ECG and ISHNE files, from the specifications (no independent writer exists in Python).

They write what the readers must read: every SCP path (default / own Huffman table / no Huffman, first and
second differences, reference beat subtraction with section 4 zones) and the ISHNE layout.
"""

from __future__ import annotations

import binascii
import struct

import numpy as np

from ecgfm_cli.io.readers_scp import DEFAULT_TABLE

#: a file's own single table: 0 -> '0', +-1 -> '10s', +-2..3 -> '110' + 2 bits (escape, the value itself),
#: else '1110' + 8 bits, '1111' + 16 bits
OWN_TABLE = ((1, 1, 1, 0, 0), (3, 3, 1, 1, 0b001), (3, 3, 1, -1, 0b101), (3, 5, 1, 0, 0b011),
             (4, 12, 1, 0, 0b0111), (4, 20, 1, 0, 0b1111))


def _rev(v: int, n: int) -> int:
    return int(format(v, f"0{n}b")[::-1], 2)


def huffman_encode(values, table) -> bytes:
    """MSB-first bit stream of ``values`` with ``table`` (structures as in readers_scp.DEFAULT_TABLE)."""
    direct = {}
    escapes = []
    for prefix, total, _mode, base, code in table:
        bits = format(_rev(code, prefix), f"0{prefix}b")
        if total == prefix:
            direct[base] = bits
        else:
            escapes.append((total - prefix, bits))
    escapes.sort()
    out = []
    for v in values:
        v = int(v)
        if v in direct:
            out.append(direct[v])
            continue
        for n_extra, bits in escapes:
            if -(1 << (n_extra - 1)) <= v < (1 << (n_extra - 1)):
                out.append(bits + format(v & ((1 << n_extra) - 1), f"0{n_extra}b"))
                break
        else:
            raise ValueError(f"{v} does not fit the table")
    s = "".join(out)
    s += "0" * (-len(s) % 8)
    return np.packbits(np.array([c == "1" for c in s], dtype=np.uint8)).tobytes()


def difference(x: np.ndarray, order: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.int64)
    if order == 0:
        return x
    if order == 1:
        return np.concatenate([[x[0]], np.diff(x)])
    d = x.copy()
    d[2:] = x[2:] - 2 * x[1:-1] + x[:-2]
    return d


def _section(sid: int, body: bytes, reserved: bytes = b"\0" * 6) -> bytes:
    body = body + b"\0" * (len(body) % 2)
    head = struct.pack("<HIBB", sid, 16 + len(body), 20, 20) + reserved
    crc = binascii.crc_hqx(head + body, 0xFFFF)
    return struct.pack("<H", crc) + head + body


def _lead_data(leads, order: int, tables) -> list[bytes]:
    out = []
    for x in leads:
        d = difference(x, order)
        if tables is None:
            out.append(d.astype("<i2").tobytes())
        else:
            out.append(huffman_encode(d, tables[0]))
    return out


def write_scp(path, leads: list[int], data: np.ndarray, *, avm: int = 5000, interval: int = 2000, order: int = 1,
              tables: str | None = "default", ref: np.ndarray | None = None, zones=(), fcm: int = 0,
              patient: dict | None = None, statements=()) -> None:
    """Write an SCP-ECG file. data: (n_leads, n) int rhythm values (the full signal: with ``ref`` (n_leads, m)
    the reference beat is subtracted inside ``zones`` [(sb, fc, se), 1-based] before encoding)."""
    data = np.asarray(data, dtype=np.int64)
    n_leads, n = data.shape
    tabs = None if tables is None else ([DEFAULT_TABLE] if tables == "default" else [OWN_TABLE])
    residual = data.copy()
    if ref is not None:
        for sb, fc, se in zones:
            for s in range(sb, se + 1):
                residual[:, s - 1] -= ref[:, s - fc + fcm - 1]
    sections: list[tuple[int, bytes]] = []
    tags = b""
    p = patient or {}
    for tag, value in ((0, p.get("last")), (1, p.get("first")), (2, p.get("id")), (21, p.get("physician"))):
        if value:
            raw = value.encode("latin-1") + b"\0"
            tags += struct.pack("<BH", tag, len(raw)) + raw
    if "birth" in p:
        tags += struct.pack("<BHHBB", 5, 4, *p["birth"])
    if "sex" in p:
        tags += struct.pack("<BHB", 8, 1, p["sex"])
    tags += struct.pack("<BHHBB", 25, 4, 2020, 5, 17) + struct.pack("<BHBBB", 26, 3, 9, 30, 15)
    tags += struct.pack("<BH", 255, 0)
    sections.append((1, tags))
    if tabs is not None:
        if tables == "default":
            sections.append((2, struct.pack("<H", 19999)))
        else:
            body = struct.pack("<HH", 1, len(OWN_TABLE))
            body += b"".join(struct.pack("<BBBhI", *c) for c in OWN_TABLE)
            sections.append((2, body))
    flags = (1 if ref is not None else 0) | 0x04 | (n_leads << 3)
    s3 = struct.pack("<BB", n_leads, flags) + b"".join(struct.pack("<IIB", 1, n, c) for c in leads)
    sections.append((3, s3))
    if ref is not None:
        m = ref.shape[1]
        s4 = struct.pack("<HHH", m * interval // 1000, fcm, len(zones))
        s4 += b"".join(struct.pack("<HIII", 0, sb, fc, se) for sb, fc, se in zones)
        s4 += b"".join(struct.pack("<II", sb, se) for sb, _fc, se in zones)
        sections.append((4, s4))
        chunks = _lead_data(ref, order, tabs)
        sections.append((5, struct.pack("<HHBB", avm, interval, order, 0)
                         + struct.pack(f"<{n_leads}H", *map(len, chunks)) + b"".join(chunks)))
    chunks = _lead_data(residual, order, tabs)
    sections.append((6, struct.pack("<HHBB", avm, interval, order, 0)
                     + struct.pack(f"<{n_leads}H", *map(len, chunks)) + b"".join(chunks)))
    if statements:
        body = struct.pack("<BHBBBBBB", 1, 2020, 5, 17, 9, 31, 0, len(statements))
        for i, st in enumerate(statements):
            raw = st.encode("latin-1") + b"\0"
            body += struct.pack("<BH", i + 1, len(raw)) + raw
        sections.append((8, body))
    # section 0: pointers to 0..11; indices are 1-based byte positions
    ids = list(range(12))
    n0 = 16 + 10 * len(ids)
    offset = 6 + n0
    built = {}
    for sid, body in sections:
        sec = _section(sid, body)
        built[sid] = (offset, sec)
        offset += len(sec)
    ptrs = b""
    for sid in ids:
        if sid == 0:
            ptrs += struct.pack("<HII", 0, n0, 7)
        elif sid in built:
            ptrs += struct.pack("<HII", sid, len(built[sid][1]), built[sid][0] + 1)
        else:
            ptrs += struct.pack("<HII", sid, 0, 0)
    s0 = _section(0, ptrs, b"SCPECG")
    rest = s0 + b"".join(built[sid][1] for sid, _ in sections)
    size = 6 + len(rest)
    tail = struct.pack("<I", size) + rest
    with open(path, "wb") as f:
        f.write(struct.pack("<H", binascii.crc_hqx(tail, 0xFFFF)) + tail)


def write_ishne(path, data: np.ndarray, specs: list[int], res_nv: list[int], fs: int = 200, *, first="Jane",
                last="Roe", pid="MRN0042", sex=2, birth=(3, 4, 1950), var: bytes = b"holter notes") -> None:
    """Write an ISHNE 1.0 Holter file. data: (n_leads, n) int16."""
    n_leads, n = data.shape
    pad12 = lambda v, fill: list(v) + [fill] * (12 - len(v))  # noqa: E731
    fixed = struct.pack("<iiiih40s40s20shh3h3h3h3hh12h12h12hh40sh80s80s88s",
                        len(var), n, 522, 522 + len(var), 1, first.encode(), last.encode(), pid.encode(), sex, 0,
                        *birth, 17, 5, 2020, 18, 5, 2020, 9, 30, 0, n_leads, *pad12(specs, -9),
                        *pad12([0] * n_leads, 0),
                        *pad12(res_nv, 0), 0, b"Recorder X", fs, b"", b"", b"")
    crc = binascii.crc_hqx(fixed + var, 0xFFFF)
    with open(path, "wb") as f:
        f.write(b"ISHNE1.0" + struct.pack("<H", crc) + fixed + var)
        f.write(np.ascontiguousarray(data.T).astype("<i2").tobytes())
