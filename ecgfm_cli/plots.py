"""PNG plots of an evaluation (matplotlib is optional: ``pip install ecgfm-cli[plots]``).

One figure per level and binary label, ``<DIR>/<level>/<label>.png``, with four panels: ROC curve (AUROC in the
legend), precision-recall curve (the baseline's curves dashed when given), a reliability diagram (quantile bins
holding at least 20 rows each, after temperature scaling too when ``--calibrate`` was used) and a decision curve.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ecgfm_cli.errors import EcgfmError

PLOTS_HINT = "pip install ecgfm-cli[plots]"


class PlotsUnavailable(EcgfmError, RuntimeError):
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
    from ecgfm_cli.io.artifacts import check_writable_dir

    check_writable_dir(path.parent, f"--plots {path}")
    if not path.exists():
        return
    if not path.is_dir():
        raise EcgfmError(f"--plots {path}: exists and is not a directory")
    entries = [p for p in path.rglob("*") if not p.is_dir()]
    plots_only = (path / "provenance.json").is_file() and all(
        p.name == "provenance.json" and p.parent == path or p.suffix == ".png" and p.parent.parent == path
        for p in entries)
    if entries and not plots_only:
        raise EcgfmError(f"--plots {path}: the directory holds files that are not an earlier `ecgfm evaluate "
                         "--plots` output, and it is replaced whole; choose a new or empty directory")


def safe_name(label: str) -> str:
    """A file-name-safe version of a label (``CRBBB|RBBB`` -> ``CRBBB_RBBB``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "label"


def pr_points(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) of the precision-recall curve, recall increasing, one point per distinct recall (the
    threshold where it was reached, i.e. its highest precision), so that a step plot (``where="pre"``) encloses
    exactly the average precision. scikit-learn's artificial end point (recall 0, precision 1), which draws a
    spike to 1 at recall 0 that no threshold achieves, is dropped: the curve starts at recall 0 with the
    precision of the highest threshold."""
    from sklearn.metrics import precision_recall_curve

    prec, rec, _ = precision_recall_curve(y, s)
    prec, rec = prec[:-1][::-1], rec[:-1][::-1]  # highest threshold first
    first = np.r_[True, np.diff(rec) > 0]
    return np.r_[0.0, rec[first]], np.r_[prec[0], prec[first]]


def label_figure(lab: str, level: str, c: dict[str, Any], base: dict[str, Any] | None = None,
                 min_bin_count: int = 20) -> Any:
    """The four-panel figure of one label: ROC (AUROC in the legend), precision-recall (AP in the legend),
    reliability diagram with quantile bins of at least ``min_bin_count`` rows, decision curve (net benefit of
    the model, treat-all, treat-none). ``c``/``base``: {"y", "s", "s_cal"?}. Returns a matplotlib Figure."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    from ecgfm_cli.metrics import adaptive_reliability_bins, average_precision, net_benefit, roc_auc

    y, s = c["y"], c["s"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    fpr, tpr, _ = roc_curve(y, s)
    axes[0].plot(fpr, tpr, label=f"model (AUROC {roc_auc(y, s):.3f})")
    rec, prec = pr_points(y, s)
    axes[1].step(rec, prec, where="pre", label=f"model (AP {average_precision(y, s):.3f})")
    pts = np.round(np.arange(0.01, 1.0, 0.01), 2)
    nb = net_benefit(y, s, pts)
    axes[3].plot(pts, nb["model"], label="model")
    if base is not None and base["y"].min() != base["y"].max():
        bf, bt, _ = roc_curve(base["y"], base["s"])
        axes[0].plot(bf, bt, "--", label=f"baseline (AUROC {roc_auc(base['y'], base['s']):.3f})")
        br, bp = pr_points(base["y"], base["s"])
        axes[1].step(br, bp, "--", where="pre", label=f"baseline (AP {average_precision(base['y'], base['s']):.3f})")
        axes[3].plot(pts, net_benefit(base["y"], base["s"], pts)["model"], "--", label="baseline")
    axes[0].plot([0, 1], [0, 1], ":", color="grey")
    axes[0].set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
    axes[1].axhline(float(np.mean(y)), ls=":", color="grey", label=f"prevalence {np.mean(y):.3f}")
    axes[1].set(xlabel="recall", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    n_bins = 0
    for key, name in (("s", "model"), ("s_cal", "temperature-scaled")):
        if key not in c:
            continue
        rb = adaptive_reliability_bins(y, c[key], min_bin_count)
        n_bins = max(n_bins, len(rb["count"]))
        axes[2].plot(rb["mean_predicted"], rb["observed"], "o-", label=name)
    axes[2].plot([0, 1], [0, 1], ":", color="grey")
    axes[2].set(xlabel="mean predicted probability", ylabel="observed frequency",
                title=f"Reliability ({n_bins} quantile bins, >= {min_bin_count} rows each)", xlim=(0, 1), ylim=(0, 1))
    axes[3].plot(pts, nb["treat_all"], color="grey", label="treat all")
    axes[3].axhline(0.0, color="black", lw=0.8, label="treat none")
    prev = float(np.mean(y))
    axes[3].set(xlabel="threshold probability", ylabel="net benefit", title="Decision curve", xlim=(0, 1),
                ylim=(min(-0.05, -0.25 * prev), max(prev * 1.1, 0.01)))
    for ax in axes:
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"{lab} ({level}-level, n={len(y)}, prevalence={prev:.3f})")
    fig.tight_layout()
    return fig


def write_plots(curves: dict[str, dict[str, Any]], out_dir: Path,
                baseline: dict[str, dict[str, Any]] | None = None) -> list[Path]:
    """Write the figures (:func:`label_figure`) for ``curves`` ({level: {label: {"y", "s", "s_cal"?}}}) under
    ``out_dir`` (which must exist; the caller makes it atomic). Returns the files written."""
    require_matplotlib()
    import matplotlib.pyplot as plt

    written = []
    for level, labs in curves.items():
        (out_dir / level).mkdir(parents=True, exist_ok=True)
        used: set[str] = set()
        for lab, c in labs.items():
            if c["y"].min() == c["y"].max():
                continue  # ROC/PR undefined with one class
            fig = label_figure(lab, level, c, (baseline or {}).get(level, {}).get(lab))
            name = safe_name(lab)
            while name in used:
                name += "_"
            used.add(name)
            path = out_dir / level / f"{name}.png"
            fig.savefig(path, dpi=80)
            plt.close(fig)
            written.append(path)
    return written
