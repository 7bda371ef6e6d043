"""Benchmark: the cost model of the chain, per record and per segment, for sizing cluster jobs (docs/scale.md).

Builds corpora of N records by replicating (symlinking) the real 12-lead WFDB records under ../shared/data (as
bench_ingest_segment.py does), then runs each step as its own process and measures, from the kernel's
accounting of that process (``os.wait4``): CPU-seconds (user + system, all threads), peak RSS, and the bytes it
wrote (the output's files). Steps:

  ingest   CORPUS -o records/          (per record)
  segment  records/ -o segments/       (per record and per segment; --dtype as given)
  pipe     ingest CORPUS | segment -   (the same two without the records artifact on disk: the >= 100k check)
  embed    segments/ --random-init --preset tiny|base  (per segment; --embed-tiny/--embed-base cap the input)
  pretrain segments/ --preset tiny, U and 3U updates (per segment trained: the difference; peak RSS includes
           the data index of the whole corpus)

Costs per record should be flat in N and peak memory should not grow with N (the data index of pretrain grows by
a few bytes per segment: reported). The machines are shared and noisy: compare ratios between sizes of one run.

    python benchmarks/bench_cost.py --sizes 2000,20000 [--pipe-sizes 100000] [--json out.json]
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ingest_segment import SHARED, build_corpus, real_records  # noqa: E402

EXE = [sys.executable, "-m", "ecgfm_cli"]


def measure(args: list[str], out: Path | None, stdin=None, stdout=subprocess.DEVNULL) -> dict:
    """Run ``ecgfm ARGS``; wall s, CPU s (user + sys), peak RSS MiB, bytes of ``out`` (file or tree)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([*EXE, *args], stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
    return _finish(proc, t0, out, args[0])


def _finish(proc: subprocess.Popen, t0: float, out: Path | None, name: str) -> dict:
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed: {err}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024,
            "bytes": tree_bytes(out) if out is not None else 0, "last_line": err.strip().splitlines()[-1]}


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def count_rows(path: Path, kind: str) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(str(f)).metadata.num_rows for f in sorted(path.glob(f"{kind}-*.parquet")))


def per(m: dict, n: int, what: str) -> dict:
    return {**m, "n": n, "per": what, "cpu_ms_per": 1e3 * m["cpu_s"] / n, "bytes_per": m["bytes"] / n}


def first_rows(segments: Path, n: int, dest: Path) -> Path:
    """The first ``n`` rows of a segments artifact as one Parquet file (streamed)."""
    import pyarrow.parquet as pq

    from ecgfm_cli.io.artifacts import open_artifact

    reader = open_artifact(segments, "segments")
    writer, left = None, n
    for b in reader.iter_batches(batch_size=256):
        b = b.slice(0, left)
        writer = writer or pq.ParquetWriter(str(dest), b.schema)
        writer.write_batch(b)
        left -= b.num_rows
        if left == 0:
            break
    writer.close()
    return dest


def pretrain_cost(segments: Path, root: Path, indexed: int, args: argparse.Namespace) -> dict:
    """Tiny-preset pretraining: two runs of ``--updates`` and 3x as many updates; the difference is the cost of
    training alone (start-up, data index and model build cancel out), the longer run's peak RSS the memory."""
    runs = []
    for k, updates in enumerate((args.updates, 3 * args.updates)):
        runs.append(measure(["pretrain", str(segments), "-o", str(root / f"pretrain{k}"), "--preset", "tiny",
                             "--batch-size", str(args.batch), "--max-updates", str(updates), "--save-every",
                             str(updates), "--workers", "1", "--device", "cpu"], None))
    trained = 2 * args.updates * args.batch
    return {"n": trained, "per": "segment trained", "segments_indexed": indexed,
            "cpu_ms_per": 1e3 * (runs[1]["cpu_s"] - runs[0]["cpu_s"]) / trained,
            "startup_cpu_s": runs[0]["cpu_s"] - (runs[1]["cpu_s"] - runs[0]["cpu_s"]) / 2, "bytes_per": 0.0,
            "peak_rss_mib": runs[1]["peak_rss_mib"], "wall_s": runs[1]["wall_s"]}


def run_size(n: int, heads: list[Path], tmp: Path, args: argparse.Namespace, first: bool) -> dict:
    root = tmp / f"n{n}"
    corpus = root / "corpus"
    records = build_corpus(heads, n, corpus)
    res: dict = {"records": len(records)}
    m = measure(["ingest", str(corpus), "-o", str(root / "rec")], root / "rec")
    res["ingest"] = per(m, len(records), "record")
    m = measure(["segment", str(root / "rec"), "-o", str(root / "seg"), "--dtype", args.dtype], root / "seg")
    segments = count_rows(root / "seg", "segments")
    res["segments"] = segments
    res["segment"] = per(m, len(records), "record")
    shutil.rmtree(root / "rec")
    presets = [("tiny", args.embed_tiny)] + ([("base", args.embed_base)] if first else [])
    for preset, cap in presets:
        src, done = root / "seg", segments
        if cap < segments:  # a CPU embeds the first `cap` segments only; the cost per segment does not depend on N
            src, done = first_rows(root / "seg", cap, root / f"seg-first{cap}.parquet"), cap
        m = measure(["embed", str(src), "--random-init", "--preset", preset, "-o", str(root / f"emb-{preset}"),
                     "--device", "cpu"], root / f"emb-{preset}")
        res[f"embed_{preset}"] = per(m, done, "segment")
    res["pretrain_tiny"] = pretrain_cost(root / "seg", root, segments, args)
    shutil.rmtree(root)
    return res


def run_pipe(n: int, heads: list[Path], tmp: Path, args: argparse.Namespace) -> dict:
    """ingest | segment without the records artifact on disk; then a few pretrain updates on the result."""
    root = tmp / f"pipe{n}"
    records = build_corpus(heads, n, root / "corpus")
    t0 = time.perf_counter()
    ingest = subprocess.Popen([*EXE, "ingest", str(root / "corpus")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    segment = subprocess.Popen([*EXE, "segment", "-", "-o", str(root / "seg"), "--dtype", args.dtype],
                               stdin=ingest.stdout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ingest.stdout.close()
    mi = _finish(ingest, t0, None, "ingest")
    ms = _finish(segment, t0, root / "seg", "segment")
    segments = count_rows(root / "seg", "segments")
    res = {"records": len(records), "segments": segments, "ingest": per(mi, len(records), "record"),
           "segment": per(ms, len(records), "record")}
    res["pretrain_tiny"] = pretrain_cost(root / "seg", root, segments, args)
    shutil.rmtree(root)
    return res


def brief(res: dict) -> dict:
    """The line printed per size: the counts of ``res`` as they are, and of each step's measurements the cost per
    unit (CPU ms, bytes), peak RSS (MiB) and wall time (s)."""
    keep = ("cpu_ms_per", "bytes_per", "peak_rss_mib", "wall_s")
    return {k: {x: v[x] for x in keep} if isinstance(v, dict) else v for k, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,20000", help="corpus sizes (records) for the full chain")
    ap.add_argument("--pipe-sizes", default="", help="sizes for ingest | segment + pretrain only, e.g. 100000")
    ap.add_argument("--dtype", default="float16", help="segment --dtype (float16 halves the bytes)")
    ap.add_argument("--embed-tiny", type=int, default=2000, help="segments the tiny model embeds at most")
    ap.add_argument("--embed-base", type=int, default=256, help="segments the base model embeds (first size only)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--updates", type=int, default=10)
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--tmp", type=Path, default=None, help="where corpora and outputs go (default: $TMPDIR)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not args.shared.is_dir():
        raise SystemExit(f"{args.shared} not found: this benchmark needs the shared corpus")
    heads = real_records(args.shared)
    out = {"cores": os.cpu_count(), "load_avg_start": os.getloadavg(), "dtype": args.dtype, "full": {}, "pipe": {}}
    with tempfile.TemporaryDirectory(prefix="ecgfm-cost-", dir=args.tmp) as tmp:
        for k, n in enumerate(int(s) for s in args.sizes.split(",") if s):
            out["full"][n] = r = run_size(n, heads, Path(tmp), args, first=k == 0)
            print(json.dumps({n: brief(r)}), flush=True)
        for n in [int(s) for s in args.pipe_sizes.split(",") if s]:
            out["pipe"][n] = r = run_pipe(n, heads, Path(tmp), args)
            print(json.dumps({f"pipe {n}": brief(r)}), flush=True)
    out["load_avg_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
