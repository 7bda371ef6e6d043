"""CMSC pair validity: how often the two adjacent 5 s segments of a CMSC pair share their rhythm label.

CMSC (ECG-FM's contrastive multi-segment coding) treats segments (0, 1), (2, 3), ... of one record as positives,
assuming a label holds over both. On CPSC 2021 (paroxysmal-AF Holter/wearable recordings with beat-level rhythm
annotations, ../shared/data/cpsc2021) every 5 s window is labelled from its annotation: ``AF`` (all of it in
AF), ``non-AF`` (none of it), ``mixed``; the windows are cut as ``ecgfm segment`` cuts them (back to back from
the record's first sample, a last partial window dropped). Prints, per record class and overall, the pairs
whose two windows have the same label, and those whose AF presence (any AF in the window) agrees. Usage:

    python scripts/experiments/cmsc_pairs.py [DATA/cpsc2021] [--seconds 5]
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import wfdb


def af_mask(record: Path) -> tuple[np.ndarray, float]:
    """Per-sample AF indicator of a record from its ``.atr`` rhythm changes (``(AFIB``/``(AFL`` start AF, any other
    rhythm ends it) and the sampling rate."""
    header = wfdb.rdheader(str(record))
    ann = wfdb.rdann(str(record), "atr")
    mask = np.zeros(header.sig_len, dtype=bool)
    state, start = False, 0
    for at, note in zip(ann.sample, ann.aux_note, strict=True):
        note = note.strip("\x00 ")
        if not note.startswith("("):
            continue
        mask[start:at] = state
        state, start = note in ("(AFIB", "(AFL"), int(at)
    mask[start:] = state
    return mask, float(header.fs)


def window_labels(mask: np.ndarray, fs: float, seconds: float) -> list[str]:
    n = int(round(seconds * fs))
    out = []
    for k in range(len(mask) // n):
        frac = mask[k * n:(k + 1) * n].mean()
        out.append("AF" if frac == 1.0 else "non-AF" if frac == 0.0 else "mixed")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(__file__).resolve().parents[2] / "../shared/data/cpsc2021"
    ap.add_argument("data", nargs="?", type=Path, default=default)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    with open(args.data / "labels.csv", newline="") as f:
        classes = {r["record"]: r["record_class"] for r in csv.DictReader(f)}
    same, present, total = Counter(), Counter(), Counter()
    kinds: dict[str, Counter] = defaultdict(Counter)
    for hea in sorted((args.data / "records").glob("*.hea")):
        mask, fs = af_mask(hea.with_suffix(""))
        labels = window_labels(mask, fs, args.seconds)
        cls = classes.get(hea.stem, "?")
        for a, b in zip(labels[0::2], labels[1::2], strict=False):
            for key in (cls, "all"):
                total[key] += 1
                same[key] += a == b
                present[key] += (a != "non-AF") == (b != "non-AF")
                kinds[key][" / ".join(sorted((a, b)))] += 1
    print("| record class | pairs | same label (AF / non-AF / mixed) | same AF presence | pair kinds |")
    print("|---|---|---|---|---|")
    for key in [*sorted(k for k in total if k != "all"), "all"]:
        kinds_text = ", ".join(f"{k} {v}" for k, v in kinds[key].most_common())
        print(f"| {key} | {total[key]} | {same[key] / total[key]:.1%} | {present[key] / total[key]:.1%} | "
              f"{kinds_text} |")


if __name__ == "__main__":
    main()
