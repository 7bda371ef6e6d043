"""Benchmark: pretraining batches per second from segments, ecgfm vs the fairseq-signals way.

Writes a synthetic segments artifact (``--records`` records x 2 segments of 12 x 2500 float32, row groups
of 128 as ``ecgfm segment`` writes them) and, for the baseline, ``--mat`` of those segments as one ``.mat``
file each the way fairseq-signals' preprocessing saves them for ECG-FM (``feats`` 12 x 2500 float64,
``org/curr_sample_rate``, ``org/curr_sample_size``, ``idx``, ``mean``, ``std``, ``segment_i``).
Then it times, with the same number of workers:

  (a) fairseq-signals' loading: one ``scipy.io.loadmat`` per segment, ``torch.from_numpy(feats).float()``,
      the random lead mask per segment (each lead zeroed with probability 0.5), ``torch.stack`` into
      batches of CMSC pairs; parallelism = a torch DataLoader with ``--workers`` processes (fairseq's
      ``num_workers``);
  (b) ecgfm's loader (``ecgfm_cli.train.data.make_loader``): row groups decoded to (n, 12, 2500) views,
      CMSC pairs, shuffle buffer, lead masks applied while gathering, ``--workers`` loader threads.

Both deliver float32 (B, 12, 2500) tensors of ``--batch`` segments with RLM applied; nothing else runs.
Prints segments/s of each (wall clock and per CPU-second), ecgfm's rate with DataLoader processes instead of
its default loader threads, and the ratios. Usage:

    python benchmarks/bench_pretrain_data.py [--records 2048] [--mat 2048] [--workers 2] [--batch 128]
                                             [--epochs 2] [--dir TMP] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LEADS, WINDOW = 12, 2500


def write_segments(path: Path, n_records: int, seed: int = 0) -> None:
    """A segments artifact as ``ecgfm segment`` writes it (record-aligned writes of 64 records, row groups
    of 128 rows), random z-scored-like signals."""
    import pyarrow as pa

    from ecgfm_cli.contract import Contract
    from ecgfm_cli.io.artifacts import ArtifactWriter, Output, write_done_marker
    from ecgfm_cli.io.schema import segments_schema

    schema = segments_schema(LEADS, WINDOW).with_metadata(
        {b"ecgfm.contract": Contract(stride=WINDOW).to_json().encode()})
    writer = ArtifactWriter(Output("dir", path), "segments", schema, row_group_rows=128)
    rng = np.random.default_rng(seed)
    for first in range(0, n_records, 64):
        recs = range(first, min(first + 64, n_records))
        n = 2 * len(recs)
        sig = rng.standard_normal((n, LEADS * WINDOW), dtype=np.float32)
        cols = {
            "record_id": pa.array([f"r{r:07d}" for r in recs for _ in range(2)]),
            "segment_index": pa.array([s for _ in recs for s in range(2)], pa.int32()),
            "start_sample": pa.array([s * WINDOW for _ in recs for s in range(2)], pa.int64()),
            "signal": pa.FixedSizeListArray.from_arrays(pa.array(sig.reshape(-1)), LEADS * WINDOW),
            "lead_present": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n * LEADS, bool)), LEADS),
            "sample_rate_orig": pa.array([500.0] * n), "padded": pa.array([False] * n),
        }
        writer.write(pa.table({f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in schema}, schema=schema))
    writer.close()
    write_done_marker(path, (0, 1), {"kind": "segments", "segments": 2 * n_records,
                                     "parts": [f.name for f in writer.files]})


def write_mats(path: Path, n: int, seed: int = 1) -> list[Path]:
    """``n`` segment files as fairseq-signals' ECG preprocessing saves them (one .mat per 5 s segment)."""
    from scipy.io import savemat

    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        f = path / f"{i // 2}_{i % 2}.mat"
        # the keys and dtypes of ECG-FM's segmented files: feats float64 (reference notes section 3)
        savemat(f, {"feats": rng.standard_normal((LEADS, WINDOW)), "org_sample_rate": 500,
                    "curr_sample_rate": 500, "org_sample_size": 2 * WINDOW, "curr_sample_size": WINDOW,
                    "idx": i // 2, "mean": rng.standard_normal((LEADS, 1)), "std": rng.random((LEADS, 1)),
                    "segment_i": i % 2})
        files.append(f)
    return files


class MatPairs:
    """fairseq-signals-style map dataset: item i = CMSC pair i, each segment one loadmat + lead mask."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files) // 2

    def _load(self, f: Path):
        import scipy.io
        import torch

        ecg = scipy.io.loadmat(f)
        feats = torch.from_numpy(ecg["feats"]).float()
        keep = torch.rand(LEADS) >= 0.5  # RandomLeadsMask, applied per segment
        return feats * keep[:, None], int(ecg["idx"][0, 0])

    def __getitem__(self, i: int):
        return [self._load(self.files[2 * i]), self._load(self.files[2 * i + 1])]


def collate(items):
    import torch

    segs = [s for pair in items for s in pair]
    return {"x": torch.stack([x for x, _ in segs]), "record": torch.tensor([r for _, r in segs])}


def _cpu() -> float:
    """CPU seconds of this process (all threads) and of its finished children (the loader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def time_baseline(files: list[Path], batch: int, workers: int, epochs: int) -> tuple[float, float]:
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(MatPairs(files), batch_size=batch // 2, shuffle=True, num_workers=workers,
                        collate_fn=collate, drop_last=True, persistent_workers=workers > 0)
    n = 0
    t, c = time.perf_counter(), _cpu()
    for _ in range(epochs):
        for b in loader:
            n += b["x"].shape[0]
            assert b["x"].dtype == torch.float32
    wall = time.perf_counter() - t
    del loader  # workers exit, so their CPU time is counted
    return n / wall, n / (_cpu() - c)


def time_ecgfm(seg_dir: Path, batch: int, workers: int, epochs: int, processes: bool = False
               ) -> tuple[float, float]:
    from ecgfm_cli.train.data import LoaderConfig, make_loader, open_segments

    t, c = time.perf_counter(), _cpu()
    index = open_segments(seg_dir)
    cfg = LoaderConfig(batch_size=batch, workers=workers, seed=0)
    it = make_loader(index, cfg, 0, max_epochs=epochs, processes=processes)
    n = 0
    for b in it:
        n += b["x"].shape[0]
    wall = time.perf_counter() - t
    del it
    return n / wall, n / (_cpu() - c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=2048, help="records (x 2 segments) in the segments artifact")
    ap.add_argument("--mat", type=int, default=2048, help=".mat segment files for the baseline")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="repeat the measurements (interleaved), keep the best "
                    "of each: a shared machine's other load only ever slows a round down")
    ap.add_argument("--dir", type=Path, help="where to write the data (default: a temporary directory)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="ecgfm-bench-data-", dir=args.dir))
    try:
        t = time.perf_counter()
        write_segments(root / "segments", args.records)
        files = write_mats(root / "mat", args.mat)
        print(f"wrote {2 * args.records} segments + {len(files)} .mat files in {time.perf_counter() - t:.0f} s "
              f"({os.cpu_count()} CPUs here)", flush=True)
        time_ecgfm(root / "segments", args.batch, 1, 1)  # page cache warm for both
        time_baseline(files, args.batch, 0, 1)
        import gc

        rounds = []
        for _ in range(args.rounds):
            r = [time_baseline(files, args.batch, args.workers, args.epochs)]
            gc.collect()
            r.append(time_ecgfm(root / "segments", args.batch, args.workers, args.epochs))
            gc.collect()
            r.append(time_ecgfm(root / "segments", args.batch, args.workers, args.epochs, processes=True))
            gc.collect()
            rounds.append(r)
        (base, ours, procs), (base_cpu, ours_cpu, procs_cpu) = (
            [max(r[i][k] for r in rounds) for i in range(3)] for k in range(2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"rounds": args.rounds, "workers": args.workers, "batch": args.batch, "segments": 2 * args.records,
              "mat_files": args.mat,
              "fairseq_loadmat_segments_per_s": round(base), "ecgfm_segments_per_s": round(ours),
              "ecgfm_processes_segments_per_s": round(procs), "ratio": round(ours / base, 2),
              "per_cpu_second": {"fairseq": round(base_cpu), "ecgfm": round(ours_cpu),
                                 "ecgfm_processes": round(procs_cpu)},
              "ratio_per_cpu_second": round(ours_cpu / base_cpu, 2)}
    print(f"training batches of {args.batch} (CMSC pairs, RLM), {args.workers} loader workers each "
          "(wall clock; per CPU-second in brackets, which a busy machine does not distort):")
    print(f"  fairseq-signals way (loadmat per segment, DataLoader processes): {base:8.0f} segments/s  "
          f"({base_cpu:.0f})")
    print(f"  ecgfm (Parquet row groups, loader threads, the default):         {ours:8.0f} segments/s  "
          f"({ours_cpu:.0f})")
    print(f"  ecgfm with DataLoader processes (--worker-processes):            {procs:8.0f} segments/s  "
          f"({procs_cpu:.0f})")
    print(f"  ratio ecgfm / fairseq: {ours / base:.1f}x wall, {ours_cpu / base_cpu:.1f}x per CPU-second")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
