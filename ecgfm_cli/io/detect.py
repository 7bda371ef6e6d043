"""Format detection by content for the hospital and Holter formats (never only by extension).

``sniff(path)`` reads a bounded head of a regular file (``HEAD`` bytes; never the whole file, never a FIFO)
and says what it is: DICOM (``DICM`` at offset 128), SCP-ECG (a section 0 at byte 6 whose id, length and
CRC-CCITT check), EDF (version ``0`` + 7 spaces and header length 256 x (1 + signals)), BDF (``\\xffBIOSEMI``),
ISHNE (``ISHNE1.0`` + the header's fixed offset; its CRC is checked when read), or XML (the root element's
name, after any BOM, prolog, comments, processing instructions and DOCTYPE; UTF-8 and UTF-16).
``read_detected`` hands the file to its reader; an XML whose root is none of the ECG formats is a ``not_ecg``
reject naming its root element.
"""

from __future__ import annotations

import binascii
import os
import re
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ecgfm_cli.io.record import RawRecord, RejectedRecord

HEAD = 16384
#: XML root element -> (reader function name in readers_xml, format)
XML_ROOTS = {"RestingECG": ("read_muse", "GE MUSE"), "restingecgdata": ("read_philips", "Philips Sierra"),
             "AnnotatedECG": ("read_hl7_aecg", "HL7 aECG")}
_XML_SKIP = re.compile(r"\s*(?:<\?.*?\?>|<!--.*?-->|<!DOCTYPE(?:[^\[>]|\[.*?\])*>)", re.S)
_XML_ROOT = re.compile(r"\s*<([A-Za-z_][\w.\-]*:)?([A-Za-z_][\w.\-]*)")


@dataclass(frozen=True)
class Detected:
    """fmt: dicom, scp, edf, bdf, ishne or xml; root: the XML root element's local name (None if not found)."""

    fmt: str
    root: str | None = None


def _xml_text(head: bytes) -> str | None:
    """The head decoded as text if it looks like XML (BOM or '<' first), else None."""
    boms = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))
    found = next(((bom, e) for bom, e in boms if head.startswith(bom)), None)
    if found:
        enc, body = found[1], head[len(found[0]):]
    else:
        stripped = head.lstrip(b" \t\r\n")
        if stripped.startswith(b"<\x00"):
            enc, body = "utf-16-le", head
        elif stripped.startswith(b"\x00<"):
            enc, body = "utf-16-be", head
        elif stripped.startswith(b"<"):
            enc, body = "utf-8", head
        else:
            return None
    if enc.startswith("utf-16") and len(body) % 2:
        body = body[:-1]
    return body.decode(enc, errors="replace")


def xml_root(text: str) -> str | None:
    """Local name of the first element of an XML text (prolog, comments, PIs and DOCTYPE skipped)."""
    pos = 0
    while m := _XML_SKIP.match(text, pos):
        if m.end() == pos:
            break
        pos = m.end()
    m = _XML_ROOT.match(text, pos)
    return m.group(2) if m else None


def _is_scp(head: bytes, size: int) -> bool:
    if len(head) < 6 + 16 + 10:
        return False
    (length,) = struct.unpack_from("<I", head, 2)
    crc0, sid, slen = struct.unpack_from("<HHI", head, 6)
    # the record length is not required to equal the size (a truncated file must still be told as SCP, then
    # rejected as truncated): section 0's id, length and CRC are the evidence
    if length < 6 + 26 or sid != 0 or not 26 <= slen <= len(head) - 6:
        return False
    return binascii.crc_hqx(head[8:6 + slen], 0xFFFF) == crc0


def _is_edf(head: bytes) -> bool:
    if len(head) < 256 or head[:8] != b"0       ":
        return False
    try:
        hlen = int(head[184:192].decode("ascii").strip())
        ns = int(head[252:256].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return False
    return ns > 0 and hlen == 256 * (1 + ns)


def sniff_bytes(head: bytes, size: int) -> Detected | None:
    """What a file is from its first bytes ``head`` (up to HEAD of them) and its size in bytes; None if none of
    the formats."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return Detected("dicom")
    if head[:8] == b"\xffBIOSEMI":
        return Detected("bdf")
    if _is_edf(head):
        return Detected("edf")
    if head[:8] == b"ISHNE1.0" and len(head) >= 26 and struct.unpack_from("<i", head, 18)[0] == 522:
        return Detected("ishne")
    if _is_scp(head, size):
        return Detected("scp")
    text = _xml_text(head)
    if text is not None:
        return Detected("xml", xml_root(text))
    return None


def sniff(path: Path) -> Detected | None:
    """Read at most HEAD bytes of ``path`` and say which format it is (None: none, or not a regular file, or
    unopenable)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None  # a FIFO, socket or device would block or never end: never opened to sniff
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            head = f.read(HEAD)
            size = f.seek(0, 2)
    except OSError:
        return None
    return sniff_bytes(head, size)


def read_detected(path: Path, det: Detected, record_id: str, opts) -> Iterator[RawRecord]:
    """Read ``path`` with the reader of its detected format."""
    if det.fmt == "dicom":
        from ecgfm_cli.io.readers_dicom import read_dicom

        yield from read_dicom(path, record_id, opts)
    elif det.fmt == "scp":
        from ecgfm_cli.io.readers_scp import read_scp

        yield from read_scp(path, record_id, opts)
    elif det.fmt in ("edf", "bdf"):
        from ecgfm_cli.io.readers_holter import read_edf

        yield from read_edf(path, record_id, opts)
    elif det.fmt == "ishne":
        from ecgfm_cli.io.readers_holter import read_ishne

        yield from read_ishne(path, record_id, opts)
    elif det.fmt == "xml":
        if det.root not in XML_ROOTS:
            known = ", ".join(f"{fmt} <{root}>" for root, (_f, fmt) in XML_ROOTS.items())
            what = f"root element <{det.root}>" if det.root else "no root element in its first bytes"
            raise RejectedRecord("not_ecg", f"{path.name}: an XML file with {what}, not an ECG format this tool "
                                            f"reads ({known})")
        from ecgfm_cli.io import readers_xml

        yield from getattr(readers_xml, XML_ROOTS[det.root][0])(path, record_id, opts)
    else:  # pragma: no cover - sniff returns only the formats above
        raise RejectedRecord("not_ecg", f"{path.name}: format {det.fmt} has no reader")
