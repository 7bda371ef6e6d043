"""Rows of docs/experiments.md from `ecgfm evaluate` reports: record-level out-of-fold AUROC for AF and the
macro AUROC over the labels with at least --min-positives positive records (the same labels in every row); with
a NAME.demo.json beside NAME.json (common.sh's demographics probe), the sex AUROC and the age R^2 too.

    python scripts/experiments/summarize.py OUT/eval/a.json OUT/eval/b.json [--min-positives 8] [--level record]

With --spread, the reports NAME-folds<S>.json (fold_noise.sh: the same embeddings probed with fold seed S) join
NAME.json's row, which then gives the mean and, in brackets, the range over the fold seeds.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable
from pathlib import Path

_FOLD_SEED = re.compile(r"-folds\d+$")


def label_aurocs(report: dict, level: str) -> dict[str, tuple[float, int]]:
    """label -> (AUROC, positives) of the evaluated labels of ``level`` (record or segment)."""
    out = {}
    for name, m in report["levels"][level]["labels"].items():
        auroc = (m.get("auroc") or {}).get("value")
        if m.get("status") == "evaluated" and auroc is not None:
            out[name] = (float(auroc), int(m.get("n_pos", 0)))
    return out


def macro_labels(rows: Iterable[dict[str, tuple[float, int]]], min_positives: int) -> list[str]:
    """The labels of the macro AUROC, the same for every row: those evaluated in each row (``label_aurocs``) with at
    least ``min_positives`` positives in each, sorted."""
    rows = list(rows)
    if not rows:
        return []
    common = set.intersection(*(set(r) for r in rows))
    return sorted(k for k in common if min(r[k][1] for r in rows) >= min_positives)


def macro_auroc(row: dict[str, tuple[float, int]], macro: list[str]) -> float | None:
    """The mean AUROC of ``row`` over the labels ``macro`` (None when there are none)."""
    return sum(row[k][0] for k in macro) / len(macro) if macro else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--min-positives", type=int, default=8)
    ap.add_argument("--level", default="record")
    ap.add_argument("--focus", default="AF")
    ap.add_argument("--spread", action="store_true", help="one row per encoder over its fold seeds: mean [min, max]")
    args = ap.parse_args()
    rows = {p.stem: label_aurocs(json.loads(p.read_text()), args.level) for p in args.reports}
    demo = {p.stem: p.with_name(p.stem + ".demo.json") for p in args.reports}
    demo = {k: json.loads(v.read_text())["levels"]["record"]["labels"] for k, v in demo.items() if v.is_file()}
    macro = macro_labels(rows.values(), args.min_positives)
    extra = " sex AUROC | age R^2 |" if demo else ""
    print(f"| encoder | {args.focus} AUROC | macro AUROC ({len(macro)} labels with >= {args.min_positives} "
          f"positives) |{extra}")
    print("|---|---|---|" + ("---|---|" if demo else ""))
    values = {}
    for name, r in rows.items():
        d = demo.get(name, {})
        values[name] = [r[args.focus][0] if args.focus in r else None,
                        macro_auroc(r, macro),
                        ((d.get("male") or {}).get("auroc") or {}).get("value"),
                        ((d.get("age") or {}).get("r2") or {}).get("value")]
    groups: dict[str, list[list[float | None]]] = {}
    for name, v in values.items():
        groups.setdefault(_FOLD_SEED.sub("", name) if args.spread else name, []).append(v)
    for name, vs in groups.items():
        cells = [cell([v[i] for v in vs]) for i in range(4 if demo else 2)]
        seeds = f" ({len(vs)} fold seeds)" if args.spread else ""
        print(f"| {name}{seeds} | " + " | ".join(cells) + " |")
    print(f"\nmacro labels: {', '.join(macro)}")


def cell(vals: list[float | None]) -> str:
    """One table cell: the value, or over several (fold seeds) their mean and [min, max]; n/a when missing."""
    got = [v for v in vals if v is not None]
    if not got:
        return "n/a"
    if len(got) == 1:
        return f"{got[0]:.3f}"
    return f"{sum(got) / len(got):.3f} [{min(got):.3f}, {max(got):.3f}]"


if __name__ == "__main__":
    main()
