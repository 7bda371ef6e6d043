"""The learning-curve figure of docs/experiments.md: out-of-fold probe AUROC against pretraining updates.

For every run NAME it reads the evaluations ``EVAL/NAME-u<updates>.json`` (and ``.demo.json``) that
learning_curve.sh wrote, one per checkpoint, and draws the macro AUROC over the labels with at least
--min-positives positive records (the same labels for every point, as summarize.py) and the sex AUROC; the
random-init encoders (``--random``, update 0) are a grey band (their range) with a dotted line (their mean).

    python scripts/experiments/plot_learning_curve.py OUT/eval --runs small-15m small-15m-t1 \\
        --random random-small-seed0 random-small-seed1 random-small-seed2 -o learning_curve.png
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from summarize import label_aurocs, macro_auroc, macro_labels


def checkpoints(eval_dir: Path, run: str) -> list[tuple[int, Path]]:
    """(updates, report path) of every ``RUN-u<updates>.json`` in ``eval_dir``, by updates."""
    pat = re.compile(re.escape(run) + r"-u(\d+)\.json$")
    found = [(int(m.group(1)), p) for p in eval_dir.iterdir() if (m := pat.match(p.name))]
    return sorted(found)


def sex_auroc(report: Path) -> float | None:
    """The sex AUROC of the demographics probe beside ``report`` (None when it was not probed)."""
    demo = report.with_name(report.stem + ".demo.json")
    if not demo.is_file():
        return None
    value = ((json.loads(demo.read_text())["levels"]["record"]["labels"].get("male") or {}).get("auroc") or {})
    return value.get("value")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("eval_dir", type=Path)
    ap.add_argument("--runs", nargs="+", required=True, help="run names (the NAME of NAME-u<updates>.json)")
    ap.add_argument("--labels", nargs="+", default=None, help="legend text per run (default: the run names)")
    ap.add_argument("--random", nargs="*", default=[], help="evaluations of random-init encoders (names)")
    ap.add_argument("--min-positives", type=int, default=8)
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {run: checkpoints(args.eval_dir, run) for run in args.runs}
    randoms = [args.eval_dir / f"{name}.json" for name in args.random]
    reports = {p: label_aurocs(json.loads(p.read_text()), "record") for pts in series.values() for _, p in pts}
    reports.update({p: label_aurocs(json.loads(p.read_text()), "record") for p in randoms})
    macro = macro_labels(reports.values(), args.min_positives)

    def macro_of(p: Path) -> float | None:
        return macro_auroc(reports[p], macro)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    panels = ((axes[0], macro_of, f"macro AUROC ({len(macro)} labels, >= {args.min_positives} positives)"),
              (axes[1], sex_auroc, "sex AUROC"))
    for ax, value, title in panels:
        rnd = [v for v in (value(p) for p in randoms) if v is not None]
        if rnd:
            ax.axhspan(min(rnd), max(rnd), color="0.85", label=f"random init ({len(rnd)} seeds): range")
            ax.axhline(sum(rnd) / len(rnd), color="0.5", ls=":", label="random init: mean")
        for i, (run, pts) in enumerate(series.items()):
            xy = [(u, v) for u, p in pts if (v := value(p)) is not None]
            if xy:
                name = args.labels[i] if args.labels and i < len(args.labels) else run
                ax.plot(*zip(*xy, strict=True), marker="o", label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("pretraining updates")
        ax.set_ylabel("out-of-fold AUROC (record level)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output} (macro labels: {', '.join(macro)})")


if __name__ == "__main__":
    main()
