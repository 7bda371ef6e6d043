"""Rows of docs/experiments.md from `ecgfm evaluate` reports: record-level out-of-fold AUROC for AF and the
macro AUROC over the labels with at least --min-positives positive records (the same labels in every row); with
a NAME.demo.json beside NAME.json (common.sh's demographics probe), the sex AUROC and the age R^2 too.

    python scripts/experiments/summarize.py OUT/eval/a.json OUT/eval/b.json [--min-positives 8] [--level record]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def label_aurocs(report: dict, level: str) -> dict[str, tuple[float, int]]:
    """label -> (AUROC, positives) of the evaluated labels of ``level`` (record or segment)."""
    out = {}
    for name, m in report["levels"][level]["labels"].items():
        auroc = (m.get("auroc") or {}).get("value")
        if m.get("status") == "evaluated" and auroc is not None:
            out[name] = (float(auroc), int(m.get("n_pos", 0)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--min-positives", type=int, default=8)
    ap.add_argument("--level", default="record")
    ap.add_argument("--focus", default="AF")
    args = ap.parse_args()
    rows = {p.stem: label_aurocs(json.loads(p.read_text()), args.level) for p in args.reports}
    demo = {p.stem: p.with_name(p.stem + ".demo.json") for p in args.reports}
    demo = {k: json.loads(v.read_text())["levels"]["record"]["labels"] for k, v in demo.items() if v.is_file()}
    common = set.intersection(*(set(r) for r in rows.values()))
    macro = sorted(k for k in common if min(rows[n][k][1] for n in rows) >= args.min_positives)
    extra = " sex AUROC | age R^2 |" if demo else ""
    print(f"| encoder | {args.focus} AUROC | macro AUROC ({len(macro)} labels with >= {args.min_positives} "
          f"positives) |{extra}")
    print("|---|---|---|" + ("---|---|" if demo else ""))
    for name, r in rows.items():
        focus = f"{r[args.focus][0]:.3f}" if args.focus in r else "n/a"
        mean = sum(r[k][0] for k in macro) / len(macro) if macro else float("nan")
        cells = ""
        if demo:
            d = demo.get(name, {})
            sex = ((d.get("male") or {}).get("auroc") or {}).get("value")
            r2 = ((d.get("age") or {}).get("r2") or {}).get("value")
            cells = f" {sex:.3f} |" if sex is not None else " n/a |"
            cells += f" {r2:.3f} |" if r2 is not None else " n/a |"
        print(f"| {name} | {focus} | {mean:.3f} |{cells}")
    print(f"\nmacro labels: {', '.join(macro)}")


if __name__ == "__main__":
    main()
