"""Benchmark: peak memory of ``ecgfm pretrain`` for the tiny and small presets, and the options that move it.

Each configuration runs ``ecgfm pretrain SEGMENTS --preset P --max-updates U -o RUN`` in a child process and
reports its peak RSS (the kernel's high-water mark: what ``/usr/bin/time -v`` calls "Maximum resident set
size", from ``wait4``), with the peaks of its two parts sampled every 20 ms from ``/proc/PID/status``: anonymous
memory (``RssAnon``: Python, torch, the activations, the loader's decoded row groups) and file-backed pages
(``RssFile``: shared libraries and any memory-mapped data file). Next to them it prints the loader's bound on
decoded signal, ``workers x min(shuffle_buffer, pairs per worker) x 2 x leads x window x 4`` bytes (plus a row group
or two per worker at block edges). Every run is a little over one epoch long (``--updates``: by default 1.1 x the
preset's updates per epoch), because an epoch is what the baseline below needs to show its cost.

Configurations per preset: its defaults; ``--workers 1``; ``--shuffle-buffer 256``; ``--batch-size`` halved with
``--update-freq 2`` (the same segments per update; not the same objective, CMSC contrasts the pairs of a
micro-batch); and the baseline, the defaults with the loader memory-mapping its segment files as it did
before 2026-12-02 (patched in the child), so the saving is measured side by side: a mapped file's pages, once
read, stayed resident, once per loader worker, so the baseline grew with the corpus and with every epoch until
each worker had read all of it.

Data: ``--segments DIR`` (e.g. ``ecgfm ingest DATA | ecgfm segment -o DIR``), or a synthetic corpus of
``--records`` two-segment records written as ``ecgfm segment`` writes them. Usage:

    python benchmarks/bench_pretrain_memory.py [--segments DIR | --records 1024] [--presets small,tiny]
                                               [--updates N] [--only defaults,mapped] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

#: The child: ``ecgfm`` itself, optionally with the loader's files mapped (the code before the fix).
_CHILD = """
import sys
if sys.argv[1] == "mapped":
    import ecgfm_cli.train.data as data
    _open = data.open_table
    data.open_table = lambda path, threads=True, memory_map=True: _open(path, threads=threads)
sys.argv = ["ecgfm", *sys.argv[2:]]
from ecgfm_cli.cli import main
main()
"""

def batch_size(preset: str) -> int:
    """The preset's default --batch-size."""
    from ecgfm_cli.model.config import RECIPES
    from ecgfm_cli.train.options import REFERENCE_BATCH_SIZE

    return int(RECIPES.get(preset, {}).get("batch_size", REFERENCE_BATCH_SIZE))


def configs(preset: str) -> list[tuple[str, list[str], bool]]:
    """(name, extra pretrain options, mapped) of each configuration of ``preset``."""
    batch = batch_size(preset)
    return [("defaults", [], False), ("mapped", [], True), ("workers1", ["--workers", "1"], False),
            ("shuffle256", ["--shuffle-buffer", "256"], False),
            ("halfbatch", ["--batch-size", str(batch // 2), "--update-freq", "2"], False)]


def run(segments: Path, out: Path, preset: str, updates: int, extra: list[str], mapped: bool) -> dict:
    """One child run: peak RSS (wait4), sampled peaks of RssAnon/RssFile, seconds, the last log line."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", _CHILD, "mapped" if mapped else "plain", "pretrain", str(segments), "--preset",
           preset, "--max-updates", str(updates), "--log-every", str(updates), "--save-every", "0", "-o", str(out),
           *extra]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"RssAnon": 0, "RssFile": 0}
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        try:
            text = Path(f"/proc/{p.pid}/status").read_text()
        except OSError:
            text = ""
        for k, v in re.findall(r"^(RssAnon|RssFile):\s+(\d+)", text, re.M):
            peak[k] = max(peak[k], int(v))
        time.sleep(0.02)
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read()
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd[3:])} failed ({p.returncode}):\n{err[-2000:]}")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "anon_mb": peak["RssAnon"] / 1024,
            "file_mb": peak["RssFile"] / 1024, "seconds": time.monotonic() - t0, "loss": log[-1]["loss"],
            "epoch": log[-1]["epoch"]}


def loader_bound_mb(pairs: int, segment_bytes: int, extra: list[str]) -> float:
    """The loader's decoded-signal bound (see the module docstring) for these options, MB; ``segment_bytes``: one
    float32 segment (leads x window x 4)."""
    from ecgfm_cli.train.options import TrainOptions

    opts = dict(zip(extra[::2], extra[1::2], strict=True))
    workers = int(opts.get("--workers", TrainOptions.workers))
    shuffle = int(opts.get("--shuffle-buffer", TrainOptions.shuffle_buffer))
    return workers * min(shuffle, pairs // workers) * 2 * segment_bytes / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--segments", type=Path, help="a segments artifact (default: a synthetic one of --records)")
    ap.add_argument("--records", type=int, default=1024, help="synthetic two-segment records (default 1024: 235 MB)")
    ap.add_argument("--presets", default="small,tiny")
    ap.add_argument("--updates", type=int, help="--max-updates of every run (default: 1.1 epochs of each preset)")
    ap.add_argument("--only", help="comma-separated configuration names (defaults, mapped, workers1, shuffle256, "
                                   "halfbatch)")
    ap.add_argument("--dir", type=Path, help="where to write data and runs (default: a temporary directory)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    root = args.dir or Path(tempfile.mkdtemp(prefix="bench_pretrain_memory_"))
    root.mkdir(parents=True, exist_ok=True)
    segments = args.segments
    if segments is None:
        from bench_pretrain_data import write_segments

        segments = root / "segments"
        if not segments.exists():
            write_segments(segments, args.records)
    from ecgfm_cli.train.data import open_segments

    index = open_segments(segments)
    pairs = index.stats.pairs
    print(f"segments: {segments} ({index.stats.describe()}; "
          f"{sum(f.stat().st_size for f in index.files) / 2**20:.0f} MB); {os.cpu_count()} CPUs; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    only = set(args.only.split(",")) if args.only else None
    results = []
    print(f"{'preset':7} {'config':11} {'peak RSS':>9} {'anon':>7} {'file':>7} {'loader bound':>12} {'s':>6}  "
          f"{'epoch':>5} loss", flush=True)
    for preset in args.presets.split(","):
        updates = args.updates or math.ceil(1.1 * pairs / (batch_size(preset) // 2))
        for name, extra, mapped in configs(preset):
            if only and name not in only:
                continue
            r = run(segments, root / f"run-{preset}-{name}", preset, updates, extra, mapped)
            r.update(preset=preset, config=name, options=extra, mapped=mapped, updates=updates,
                     loader_bound_mb=loader_bound_mb(pairs, index.n_leads * index.window * 4, extra))
            results.append(r)
            print(f"{preset:7} {name:11} {r['peak_rss_mb']:7.0f}MB {r['anon_mb']:5.0f}MB {r['file_mb']:5.0f}MB "
                  f"{r['loader_bound_mb']:10.0f}MB {r['seconds']:6.1f}  {r['epoch']:5.2f} {r['loss']:.4f}",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps({"segments": str(segments), "pairs": pairs,
                                         "load": os.getloadavg()[0], "results": results}, indent=2) + "\n")
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
