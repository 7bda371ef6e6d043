"""Benchmark: raw WFDB records -> 5 s model-input windows, ecgfm vs the fairseq-signals way.

Builds a corpus of >= N records by replicating (symlinking) the real WFDB records under ../shared/data,
then times on the same cores:

  (a) the reference pipeline as fairseq-signals runs it: wfdb.rdsamp, scipy interp1d to 500 Hz, z-score,
      one scipy.io.savemat per 5 s segment (a process pool with one worker per core);
  (b) ``ecgfm ingest CORPUS | ecgfm segment -o OUT`` (two processes in a pipe).

Prints records/s of each, the ratio, and each ecgfm process's peak RSS. Usage:

    python benchmarks/bench_ingest_segment.py [--records 3000] [--workers 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
# Georgia 2020-release headers that wfdb rejects: the reference pipeline cannot read them.
WFDB_UNREADABLE = {"E00015", "E00018", "E00793"}
# 12-lead resting ECGs, the population ECG-FM is trained on (MIMIC-IV-ECG is 10 s 12-lead at 500 Hz).
RESTING = ("physionet_challenge_2020_2021/records", "ptbxl/records500", "ptbxl/records100",
           "challenge2025_code15/records")
# Long two-lead Holter records (CPSC 2021, up to 9 min): many windows per record.
HOLTER = ("cpsc2021/records",)


def real_records(shared: Path, holter: bool = False) -> list[Path]:
    heads = []
    for sub in RESTING + (HOLTER if holter else ()):
        heads += [h for h in sorted((shared / sub).rglob("*.hea")) if h.stem not in WFDB_UNREADABLE]
    return heads


def build_corpus(heads: list[Path], n: int, root: Path) -> list[Path]:
    """Symlink ``heads`` (and their signal files) into ``root/rep_NNN/`` until there are >= n records."""
    out = []
    rep = 0
    while len(out) < n:
        d = root / f"rep_{rep:03d}"
        for h in heads:
            sub = d / h.parent.name
            sub.mkdir(parents=True, exist_ok=True)
            for f in h.parent.glob(h.stem + ".*"):
                if f.suffix in (".hea", ".dat", ".mat"):
                    os.symlink(f, sub / f.name)
            out.append(sub / h.name)
            if len(out) >= n:
                break
        rep += 1
    return out


def reference_one(args: tuple[str, str]) -> int:
    """fairseq-signals' per-record work: rdsamp, interp1d, z-score, savemat per 5 s segment."""
    import scipy.io
    import wfdb
    from scipy.interpolate import interp1d

    hea, out_dir = args
    x, fields = wfdb.rdsamp(hea[:-4])
    x = x.T
    fs = fields["fs"]
    n = x.shape[1]
    n_new = int(n * 500 / fs)
    x = interp1d(np.linspace(0, n_new - 1, n), x)(np.arange(n_new))
    mean, std = x.mean(axis=1, keepdims=True), x.std(axis=1, keepdims=True)
    x = (x - mean) / np.where(std == 0, 1, std)
    stem = Path(hea).parent.parent.name + "_" + Path(hea).stem
    for i in range(n_new // 2500):
        scipy.io.savemat(f"{out_dir}/{stem}_{i}.mat", {
            "feats": x[:, i * 2500:(i + 1) * 2500], "curr_sample_rate": 500, "org_sample_rate": fs,
            "curr_sample_size": 2500, "org_sample_size": n, "idx": 0, "segment_i": i})
    return 1


def run_reference(heads: list[Path], out_dir: Path, procs: int) -> float:
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with Pool(procs) as pool:
        done = sum(pool.imap_unordered(reference_one, [(str(h), str(out_dir)) for h in heads], chunksize=16))
    dt = time.perf_counter() - t0
    assert done == len(heads)
    return dt


def run_ecgfm(corpus: Path, out_dir: Path, workers: int) -> tuple[float, dict]:
    exe = [sys.executable, "-m", "ecgfm_cli"]
    t0 = time.perf_counter()
    ingest = subprocess.Popen([*exe, "ingest", str(corpus), "--workers", str(workers)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    segment = subprocess.Popen([*exe, "segment", "-", "-o", str(out_dir)], stdin=ingest.stdout,
                               stderr=subprocess.PIPE)
    ingest.stdout.close()
    rss = {}
    for name, proc in (("ingest", ingest), ("segment", segment)):
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        rss[name] = usage.ru_maxrss / 1024  # KiB -> MiB (Linux)
    dt = time.perf_counter() - t0
    for name, proc in (("ingest", ingest), ("segment", segment)):
        err = proc.stderr.read().decode()
        print(f"  {name}: {err.strip().splitlines()[-1] if err.strip() else ''}")
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed ({proc.returncode}): {err}")
    return dt, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=1, help="ecgfm ingest --workers")
    ap.add_argument("--procs", type=int, default=os.cpu_count(), help="reference pool size (cores)")
    ap.add_argument("--reference-records", type=int, default=None,
                    help="time the reference on the first K records only (default: all)")
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--holter", action="store_true", help="also replicate the long CPSC 2021 Holter records")
    args = ap.parse_args()
    if not args.shared.is_dir():
        raise SystemExit(f"{args.shared} not found: this benchmark needs the shared corpus")
    heads = real_records(args.shared, args.holter)
    with tempfile.TemporaryDirectory(prefix="ecgfm-bench-") as tmp:
        tmp = Path(tmp)
        corpus = build_corpus(heads, args.records, tmp / "corpus")
        print(f"corpus: {len(corpus)} records ({len(heads)} distinct real WFDB records), {os.cpu_count()} cores")
        ref_heads = corpus[: args.reference_records] if args.reference_records else corpus
        t_ref = run_reference(ref_heads, tmp / "ref", args.procs)
        ref_rate = len(ref_heads) / t_ref
        print(f"reference (rdsamp + interp1d + savemat per segment, {args.procs} procs): "
              f"{len(ref_heads)} records in {t_ref:.1f} s = {ref_rate:.0f} records/s")
        shutil.rmtree(tmp / "ref")
        t_ours, rss = run_ecgfm(tmp / "corpus", tmp / "ours", args.workers)
        rate = len(corpus) / t_ours
        print(f"ecgfm ingest | ecgfm segment (ingest --workers {args.workers}): {len(corpus)} records in "
              f"{t_ours:.1f} s = {rate:.0f} records/s; peak RSS ingest {rss['ingest']:.0f} MiB, "
              f"segment {rss['segment']:.0f} MiB")
        print(f"ratio: {rate / ref_rate:.1f}x")
        if args.json:
            args.json.write_text(json.dumps({"records": len(corpus), "reference_rps": ref_rate, "ecgfm_rps": rate,
                                             "ratio": rate / ref_rate, "peak_rss_mib": rss}, indent=2))


if __name__ == "__main__":
    main()
