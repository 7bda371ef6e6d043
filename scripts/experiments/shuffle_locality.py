"""Shuffle locality of pretraining batches: how often two items (CMSC pairs) of one batch, i.e. a CMSC positive's
negatives, come from the same source folder or the same patient, against what a global shuffle gives.

The loader shuffles row groups per epoch and items within blocks of --shuffle-buffer pairs (bounded memory), not
globally; this measures the batches it plans (``train.data.epoch_plan``, no signal is read). Usage:

    python scripts/experiments/shuffle_locality.py SEGMENTS [--batch-size 128] [--workers 2] [--shuffle-buffer 1024]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ecgfm_cli.train.data import LoaderConfig, epoch_plan, open_segments  # noqa: E402


def same_rate(keys: np.ndarray) -> float:
    """P(two distinct items share a key) for items drawn uniformly without replacement (null keys never match)."""
    _, counts = np.unique(keys[keys >= 0], return_counts=True)
    n = len(keys)
    return float((counts * (counts - 1)).sum() / (n * (n - 1))) if n > 1 else 0.0


def codes(values: list) -> np.ndarray:
    """Integer codes of ``values`` (-1 for None/empty)."""
    lookup: dict = {}
    return np.array([-1 if v in (None, "") else lookup.setdefault(v, len(lookup)) for v in values], dtype=np.int64)


def same_batch_rate(plans: list[np.ndarray], keys: np.ndarray) -> float:
    """P(two distinct items of one batch share a key), over every batch of ``plans`` (each ``(n_batches,
    batch_items)`` item rows, as ``epoch_plan`` gives them; null keys never match)."""
    hits = total = 0
    for plan in plans:
        for batch in plan:
            k = keys[batch]
            _, c = np.unique(k[k >= 0], return_counts=True)
            hits += int((c * (c - 1)).sum())
            total += len(batch) * (len(batch) - 1)
    return hits / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("segments", type=Path)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shuffle-buffer", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    index = open_segments(args.segments, None, "shuffle_locality")
    cols = [pq.read_table(str(f), columns=["source_path", "patient_id"]) for f in index.files]
    source = codes([str(Path(p).parent) for c in cols for p in c.column("source_path").to_pylist()])
    patient = codes([p for c in cols for p in c.column("patient_id").to_pylist()])
    cfg = LoaderConfig(batch_size=args.batch_size, workers=args.workers, shuffle_buffer=args.shuffle_buffer)
    items = index.pair_first
    print(f"{len(items)} CMSC pairs, batch {args.batch_size} ({cfg.batch_items} pairs), {args.workers} worker(s), "
          f"shuffle buffer {args.shuffle_buffer}, {args.epochs} epoch(s)")
    plans = [epoch_plan(index, cfg, e, c) for e in range(args.epochs) for c in range(cfg.consumers)]  # planned once
    print("| pairs from | in the loader's batches | global shuffle |")
    print("|---|---|---|")
    for name, key in (("the same source folder", source), ("the same patient", patient)):
        print(f"| {name} | {same_batch_rate(plans, key):.1%} | {same_rate(key[items]):.1%} |")


if __name__ == "__main__":
    main()
