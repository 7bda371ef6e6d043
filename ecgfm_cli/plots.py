"""PNG plots of an evaluation (matplotlib is optional: ``pip install ecgfm-cli[plots]``).

One figure per level and binary label, ``<DIR>/<level>/<label>.png``, with three panels: ROC curve,
precision-recall curve (the baseline's curves dashed when given) and a reliability diagram (15 equal-width bins,
after temperature scaling too when ``--calibrate`` was used).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

PLOTS_HINT = "pip install ecgfm-cli[plots]"


class PlotsUnavailable(RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raise :class:`PlotsUnavailable` (with the install hint) when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise PlotsUnavailable(f"--plots needs matplotlib, which is not installed: {PLOTS_HINT}") from e


def check_plots_dir(path: Path) -> None:
    """Fail (one line) unless ``path`` may be replaced whole by a plots directory: it does not exist, is an empty
    directory, or holds only an earlier evaluation's plots (``provenance.json`` and ``<level>/<label>.png``)."""
    from ecgfm_cli.console import fail
    from ecgfm_cli.io.artifacts import check_writable_dir

    check_writable_dir(path.parent, f"--plots {path}")
    if not path.exists():
        return
    if not path.is_dir():
        fail(f"--plots {path}: exists and is not a directory")
    entries = [p for p in path.rglob("*") if not p.is_dir()]
    plots_only = (path / "provenance.json").is_file() and all(
        p.name == "provenance.json" and p.parent == path or p.suffix == ".png" and p.parent.parent == path
        for p in entries)
    if entries and not plots_only:
        fail(f"--plots {path}: the directory holds files that are not an earlier `ecgfm evaluate --plots` output, "
             "and it is replaced whole; choose a new or empty directory")


def safe_name(label: str) -> str:
    """A file-name-safe version of a label (``CRBBB|RBBB`` -> ``CRBBB_RBBB``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "label"


def write_plots(curves: dict[str, dict[str, Any]], out_dir: Path,
                baseline: dict[str, dict[str, Any]] | None = None) -> list[Path]:
    """Write the figures for ``curves`` ({level: {label: {"y", "s", "s_cal"?}}}) under ``out_dir`` (which must
    exist; the caller makes it atomic). Returns the files written."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    from ecgfm_cli.metrics import ECE_BINS, reliability_bins

    written = []
    for level, labs in curves.items():
        (out_dir / level).mkdir(parents=True, exist_ok=True)
        used: set[str] = set()
        for lab, c in labs.items():
            y, s = c["y"], c["s"]
            if y.min() == y.max():
                continue  # ROC/PR undefined with one class
            fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
            base = (baseline or {}).get(level, {}).get(lab)
            fpr, tpr, _ = roc_curve(y, s)
            axes[0].plot(fpr, tpr, label="model")
            prec, rec, _ = precision_recall_curve(y, s)
            axes[1].step(rec, prec, where="post", label="model")
            if base is not None and base["y"].min() != base["y"].max():
                bf, bt, _ = roc_curve(base["y"], base["s"])
                axes[0].plot(bf, bt, "--", label="baseline")
                bp, br, _ = precision_recall_curve(base["y"], base["s"])
                axes[1].step(br, bp, "--", where="post", label="baseline")
            axes[0].plot([0, 1], [0, 1], ":", color="grey")
            axes[0].set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
            axes[1].axhline(float(np.mean(y)), ls=":", color="grey")
            axes[1].set(xlabel="recall", ylabel="precision", title="Precision-recall", ylim=(0, 1.02))
            for key, name in (("s", "model"), ("s_cal", "temperature-scaled")):
                if key not in c:
                    continue
                rb = reliability_bins(y, c[key], ECE_BINS)
                pts = [(p, o) for p, o in zip(rb["mean_predicted"], rb["observed"], strict=True) if p is not None]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    axes[2].plot(xs, ys, "o-", label=name)
            axes[2].plot([0, 1], [0, 1], ":", color="grey")
            axes[2].set(xlabel="mean predicted probability", ylabel="observed frequency",
                        title=f"Reliability ({ECE_BINS} bins)", xlim=(0, 1), ylim=(0, 1))
            for ax in axes:
                ax.legend(loc="best", fontsize=8)
            fig.suptitle(f"{lab} ({level}-level, n={len(y)}, prevalence={np.mean(y):.3f})")
            fig.tight_layout()
            name = safe_name(lab)
            while name in used:
                name += "_"
            used.add(name)
            path = out_dir / level / f"{name}.png"
            fig.savefig(path, dpi=80)
            plt.close(fig)
            written.append(path)
    return written
