"""Benchmark: files/s per core of each hospital/Holter reader beside the WFDB fast path, in one run.

Every format reads 10 s, 12-lead records (or the sample files' own 10 s records): WFDB (format 16, 500 Hz,
written here with wfdb), EDF and BDF (pyedflib, 500 Hz), ISHNE (the test suite's writer, 500 Hz), SCP-ECG
(the two committed sample files: 8 stored leads at 600 Hz, Huffman-coded), DICOM (the committed sample:
12 x 10,000 at 1 kHz), GE MUSE, Philips Sierra (XLI) and HL7 aECG (the committed samples). Each file is read
through ``read_source`` (detection by content included) in one process, one thread: files/s per core.
Formats whose sample files are absent are listed as skipped. Usage:

    python benchmarks/bench_readers.py [--seconds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

HOSP = REPO / "sample_data" / "hospital_formats"
LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def _ecg_like(n_leads: int, n: int, fs: float, seed: int = 0) -> np.ndarray:
    """(n_leads, n) mV: a 72 bpm spike train plus noise, so that compressors see ECG-like statistics."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / fs
    beat = np.exp(-(((t % (60 / 72)) - 0.3) ** 2) / (2 * 0.01 ** 2))
    return (beat[None, :] * rng.uniform(0.5, 1.5, (n_leads, 1)) + rng.normal(0, 0.02, (n_leads, n))).astype(np.float64)


def make_files(tmp: Path) -> dict[str, list[Path]]:
    import pyedflib
    import wfdb

    from tests.scp_writer import write_ishne

    out: dict[str, list[Path]] = {}
    x = _ecg_like(12, 5000, 500.0)
    wfdb.wrsamp("rec", fs=500, units=["mV"] * 12, sig_name=LEADS, p_signal=x.T, fmt=["16"] * 12,
                adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(tmp))
    out["wfdb"] = [tmp / "rec.hea"]
    for kind, ft, dmax in (("edf", pyedflib.FILETYPE_EDFPLUS, 32767), ("bdf", pyedflib.FILETYPE_BDFPLUS, 8388607)):
        path = tmp / f"rec.{kind}"
        w = pyedflib.EdfWriter(str(path), 12, file_type=ft)
        for i, lead in enumerate(LEADS):
            w.setSignalHeader(i, {"label": f"ECG {lead}", "dimension": "mV", "sample_frequency": 500,
                                  "physical_max": 5.0, "physical_min": -5.0, "digital_max": dmax,
                                  "digital_min": -dmax - 1})
        w.writeSamples(list(x))
        w.close()
        out[kind] = [path]
    write_ishne(tmp / "rec.ecg", np.round(x * 200).astype(np.int16), list(range(5, 17)), [5000] * 12, fs=500)
    out["ishne"] = [tmp / "rec.ecg"]
    globs = {"scp-ecg": "scp_ecg/*.SCP", "dicom-ecg": "dicom/*.dcm", "ge-muse-xml": "ge_muse/*.xml",
             "philips-xml": "philips_sierra/*.[xX][mM][lL]", "hl7-aecg": "hl7_aecg/subject1_0.xml"}
    for fmt, pattern in globs.items():
        out[fmt] = sorted(HOSP.glob(pattern))
    return out


def bench(files: list[Path], seconds: float) -> dict:
    from ecgfm_cli.io.readers import ReadOptions, Source, _kind, read_source
    from ecgfm_cli.io.record import RawRecord

    opts = ReadOptions()
    sources = [Source(f, f, _kind(f.name) or "sniff") for f in files]
    first = [r for s in sources for r in read_source(s, opts)]
    bad = [r for r in first if not isinstance(r, RawRecord)]
    if bad:
        return {"error": "; ".join(f"{r.reason}: {r.detail}" for r in bad)}
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        for s in sources:
            for _ in read_source(s, opts):
                pass
            n += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rec = first[0]
    return {"files": n, "files_per_s": n / wall, "files_per_cpu_s": n / cpu,
            "shape": f"{rec.n_leads}x{rec.n_samples} @ {rec.sample_rate:g} Hz"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="time per format (s)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(Path(tmp))
        for fmt, paths in files.items():
            results[fmt] = bench(paths, args.seconds) if paths else {"error": "no sample file"}
    base = results["wfdb"].get("files_per_cpu_s")  # per CPU-second: steady when other work shares the cores
    print(f"{'format':<13} {'record':<22} {'files/s':>9} {'files/CPU-s':>12} {'vs WFDB':>8}")
    for fmt, r in results.items():
        if "error" in r:
            print(f"{fmt:<13} skipped: {r['error']}")
            continue
        rel = f"{r['files_per_cpu_s'] / base:.2f}x" if base else "-"
        print(f"{fmt:<13} {r['shape']:<22} {r['files_per_s']:9.0f} {r['files_per_cpu_s']:12.0f} {rel:>8}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
