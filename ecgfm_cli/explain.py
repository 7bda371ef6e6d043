"""``ecgfm explain``: a record or segment on standard 12-lead ECG paper, with a classifier's saliency over it.

Layers, pure at the core:

* :func:`paper_layout` - where each lead goes: the 3 x 4 panels (I, aVR, V1, V4 / II, aVL, V2, V5 / III, aVF, V3,
  V6; 2.5 s each) and the 10 s lead II rhythm strip, in paper coordinates (s, mV); :func:`paper_size_mm` the paper.
* :func:`frames_to_samples` - per-frame values (one per encoder token) -> per-sample values through the conv stack's
  receptive fields; :func:`attention_saliency` / :func:`grad_x_input` - the two saliency maps;
  :func:`concat_segments` - segments of a record laid end to end in time.
* :func:`draw_paper` - the matplotlib figure (25 mm/s, 10 mm/mV, 1 mm / 5 mm grid), saliency as a heat overlay.

Shapes: S segments, C leads, L samples per segment, T encoder frames (156 for ECG-FM's 2500 samples), N samples
of the drawn signal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ecgfm_cli.errors import EcgfmError

#: The standard 12-lead paper layout: rows of leads, each column 2.5 s of the same (simultaneous) time.
PAPER_ROWS: tuple[tuple[str, ...], ...] = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"),
                                           ("III", "aVF", "V3", "V6"))
RHYTHM_LEAD = "II"
MM_PER_S = 25.0
MM_PER_MV = 10.0
COLUMN_S = 2.5
RHYTHM_S = 10.0
ROW_MV = 3.0  # baseline-to-baseline spacing of the rows (30 mm)
#: Drawing scale of z-scored segments, in paper mV per standard deviation (2.5 mm per SD): a lead's SD is about
#: 0.1-0.3 mV, so QRS complexes of 5-10 SD stay within their row, near their size in mV at 10 mm/mV.
Z_MV_PER_SD = 0.25
GRID_MINOR_COLOR = "#f7c6c6"
GRID_MAJOR_COLOR = "#e88c8c"
TRACE_COLOR = "black"
FORMATS = ("png", "svg", "pdf")


class ExplainError(EcgfmError, ValueError):
    """Input ``explain`` cannot draw; the message is one line for the user."""


@dataclass(frozen=True)
class Panel:
    """One trace on the paper. lead: its name. x0: left edge on the paper (s); y0: its baseline (mV).
    t0, t1: the time of the signal it shows (s from the start of the drawn signal)."""

    lead: str
    x0: float
    y0: float
    t0: float
    t1: float


def paper_layout(duration_s: float, leads: Sequence[str]) -> list[Panel]:
    """The 12 panels (rows of :data:`PAPER_ROWS`, column c at paper x = 2.5 c s showing time [2.5 c, 2.5 c + 2.5))
    and the lead II rhythm strip (paper x 0, its first 10 s), for a signal of ``duration_s`` seconds.

    Leads not in ``leads`` get no panel. A signal shorter than 10 s (a 5 s segment) wraps: column c shows time
    [2.5 c mod D', ...) with D' the signal's length in whole 2.5 s columns, so columns 3-4 repeat columns 1-2; a
    signal shorter than 2.5 s fills what it has. Baselines: row r at y = -ROW_MV * r, the strip one row below.
    """
    have = set(leads)
    whole = math.floor(duration_s / COLUMN_S + 1e-9) * COLUMN_S
    panels = []
    for r, row in enumerate(PAPER_ROWS):
        for c, lead in enumerate(row):
            if lead not in have:
                continue
            t0 = (c * COLUMN_S) % whole if whole > 0 else 0.0
            panels.append(Panel(lead, c * COLUMN_S, -ROW_MV * r, t0, min(t0 + COLUMN_S, duration_s)))
    if RHYTHM_LEAD in have:
        panels.append(Panel(RHYTHM_LEAD, 0.0, -ROW_MV * len(PAPER_ROWS), 0.0, min(RHYTHM_S, duration_s)))
    return panels


def paper_limits() -> tuple[tuple[float, float], tuple[float, float]]:
    """(x limits (s), y limits (mV)) of the paper: 10 s wide, half a row above the first baseline and below the
    rhythm strip's."""
    top = ROW_MV * 0.5
    bottom = -ROW_MV * len(PAPER_ROWS) - ROW_MV * 0.5
    return (0.0, RHYTHM_S), (bottom, top)


def paper_size_mm() -> tuple[float, float]:
    """(width, height) of the paper in mm at 25 mm/s and 10 mm/mV: 250 x 120 mm (4 rows of 30 mm)."""
    (x0, x1), (y0, y1) = paper_limits()
    return (x1 - x0) * MM_PER_S, (y1 - y0) * MM_PER_MV


# ============================================================================ saliency


def receptive_field(conv_layers: Sequence[tuple[int, int, int]]) -> tuple[int, int]:
    """(jump, size) in input samples of a stack of (channels, kernel, stride) convs without padding: frame t reads
    samples [t * jump, t * jump + size). ECG-FM's 4 x (kernel 2, stride 2): (16, 16)."""
    jump, size = 1, 1
    for _, kernel, stride in conv_layers:
        size += (kernel - 1) * jump
        jump *= stride
    return jump, size


def frames_to_samples(values: np.ndarray, conv_layers: Sequence[tuple[int, int, int]], length: int) -> np.ndarray:
    """(..., T) per-frame values -> (..., length) per-sample values: each sample gets the mean of the frames whose
    receptive field holds it; NaN for samples no frame reads (the conv stack drops a remainder at the end)."""
    v = np.asarray(values, dtype=np.float64)
    t = v.shape[-1]
    jump, size = receptive_field(conv_layers)
    starts = np.arange(t) * jump
    ends = np.minimum(starts + size, length)
    flat = v.reshape(-1, t)
    total = np.zeros((flat.shape[0], length + 1))
    count = np.zeros(length + 1)
    np.add.at(total, (slice(None), starts), flat)
    np.add.at(total, (slice(None), ends), -flat)
    np.add.at(count, starts, 1.0)
    np.add.at(count, ends, -1.0)
    total, count = np.cumsum(total, axis=1)[:, :length], np.cumsum(count)[:length]
    out = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return out.reshape(*v.shape[:-1], length)


def attention_saliency(attention: np.ndarray, reduce: str = "received") -> np.ndarray:
    """Last-layer attention (S, T, T) (query x key, averaged over heads) -> (S, T) per-frame saliency.

    ``received``: mean over queries of the attention each key frame gets (how much of the model's attention
    lands on that time). ``seed``: ECG-FM's saliency script's reduction, the max over keys for each query frame.
    """
    a = np.asarray(attention, dtype=np.float64)
    if reduce == "received":
        return a.mean(axis=1)
    if reduce == "seed":
        return a.max(axis=2)
    raise ExplainError(f"--attention {reduce!r}: expected received or seed")


def grad_x_input(model: Callable, x: np.ndarray, label: int, lead_mask: np.ndarray | None = None) -> np.ndarray:
    """Gradient x input of logit ``label`` w.r.t. the model input: (S, C, L) float -> (S, C, L) float64.

    ``model``: a torch module (S, C, L) -> (S, K) logits (its conv stack must let gradients through).
    ``lead_mask`` (C,) bool: leads where it is False are zeroed first (as the model was trained), so their
    saliency is 0. Each segment's logit depends only on that segment, so one backward pass serves all.
    """
    import torch

    t = torch.tensor(np.asarray(x, dtype=np.float32))
    if lead_mask is not None:
        t = t * torch.from_numpy(np.asarray(lead_mask, dtype=np.float32))[None, :, None]
    t.requires_grad_(True)
    with torch.enable_grad():
        out = model(t)[:, label].sum()
        (grad,) = torch.autograd.grad(out, t)
    return (grad * t).detach().double().numpy()


def concat_segments(starts: Sequence[int], values: np.ndarray, n: int | None = None) -> np.ndarray:
    """Segments of one record laid in time: ``values`` (S, ..., L) placed at sample ``starts[s]`` -> (..., N),
    the mean where windows overlap (stride < window), NaN where no finite value falls (N = last start + L unless
    given); each element (lead, sample) on its own, so an absent (NaN) lead leaves the others alone."""
    v = np.asarray(values, dtype=np.float64)
    length = v.shape[-1]
    n = int(max(starts) + length) if n is None else n
    total = np.zeros(v.shape[1:-1] + (n,))
    count = np.zeros(v.shape[1:-1] + (n,))
    for s, start in enumerate(starts):
        ok = np.isfinite(v[s])
        total[..., start:start + length] += np.where(ok, v[s], 0.0)
        count[..., start:start + length] += ok
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def smooth(values: np.ndarray, width: int) -> np.ndarray:
    """Moving average over the last axis (``width`` samples, centred, NaN-aware): sample-level gradient x input is
    too spiky to read at 25 mm/s."""
    if width <= 1:
        return np.asarray(values, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    kernel = np.ones(width)
    flat_v, flat_ok = np.where(ok, v, 0.0).reshape(-1, v.shape[-1]), ok.reshape(-1, v.shape[-1]).astype(float)
    num = np.stack([np.convolve(r, kernel, mode="same") for r in flat_v])
    den = np.stack([np.convolve(r, kernel, mode="same") for r in flat_ok])
    return np.where(den > 0, num / np.maximum(den, 1e-12), np.nan).reshape(v.shape)


def normalise(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] over all finite values (NaN kept); a constant map becomes 0."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    if not ok.any():
        return v
    lo, hi = v[ok].min(), v[ok].max()
    return (v - lo) / (hi - lo) if hi > lo else np.where(ok, 0.0, np.nan)


# ============================================================================ drawing


def draw_paper(signal: np.ndarray, leads: Sequence[str], fs: float, title: str = "", amplitude: str = "mV",
               saliency: np.ndarray | None = None, saliency_label: str = "", dpi: int = 150):
    """The paper figure of ``signal`` (C, N) (leads named ``leads``, sampled at ``fs`` Hz; ``amplitude``: "mV",
    or "z" for z-scored segments, drawn at :data:`Z_MV_PER_SD` paper mV (2.5 mm) per standard deviation).

    ``saliency``: optional (C, N) or (N,) values in [0, 1] (NaN = none) drawn as a heat overlay behind each trace,
    over the same time. Each panel's trace is drawn about its own median (a DC offset or baseline wander would
    push it into the next row); amplitudes are not changed. Absent leads (all NaN) get an empty panel. The axes
    map 1 s to 25 mm and 1 mV to 10 mm exactly. Returns the Figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MultipleLocator

    signal = np.asarray(signal, dtype=np.float64) * (1.0 if amplitude == "mV" else Z_MV_PER_SD)
    n = signal.shape[1]
    duration = n / fs
    (x0, x1), (y0, y1) = paper_limits()
    width_mm, height_mm = paper_size_mm()
    margin_mm = (8.0, 8.0, 14.0, 10.0)  # left, right, top, bottom
    fig_w = (width_mm + margin_mm[0] + margin_mm[1]) / 25.4
    fig_h = (height_mm + margin_mm[2] + margin_mm[3]) / 25.4
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
    ax = fig.add_axes((margin_mm[0] / 25.4 / fig_w, margin_mm[3] / 25.4 / fig_h,
                       width_mm / 25.4 / fig_w, height_mm / 25.4 / fig_h))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.xaxis.set_major_locator(MultipleLocator(5 / MM_PER_S))
    ax.xaxis.set_minor_locator(MultipleLocator(1 / MM_PER_S))
    ax.yaxis.set_major_locator(MultipleLocator(5 / MM_PER_MV))
    ax.yaxis.set_minor_locator(MultipleLocator(1 / MM_PER_MV))
    ax.grid(which="minor", color=GRID_MINOR_COLOR, linewidth=0.3)
    ax.grid(which="major", color=GRID_MAJOR_COLOR, linewidth=0.7)
    ax.set_axisbelow(True)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    for spine in ax.spines.values():
        spine.set_color(GRID_MAJOR_COLOR)

    index = {name: i for i, name in enumerate(leads)}
    sal = None if saliency is None else np.asarray(saliency, dtype=np.float64)
    from matplotlib.colors import ListedColormap

    ramp = plt.get_cmap("Blues")(np.linspace(0.35, 1.0, 256))
    ramp[:, 3] = np.linspace(0.0, 0.75, 256)  # low saliency transparent: the grid stays readable
    cmap = ListedColormap(ramp)
    for p in paper_layout(duration, leads):
        c = index[p.lead]
        a, b = int(round(p.t0 * fs)), int(round(p.t1 * fs))
        t = p.x0 + (np.arange(a, b) - a) / fs
        trace = signal[c, a:b]
        if not np.isfinite(trace).any():  # an absent lead: an empty panel, without an overlay
            ax.text(p.x0 + 0.04, p.y0 + ROW_MV * 0.3, p.lead, fontsize=7, zorder=4, color="grey")
            continue
        trace = trace - np.nanmedian(trace)  # baseline to the panel's median, as a machine's baseline filter
        if sal is not None:
            row = sal[c] if sal.ndim == 2 else sal
            band = np.ma.masked_invalid(row[a:b][None, :])
            ax.imshow(band, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest",
                      extent=(p.x0, p.x0 + (b - a) / fs, p.y0 - ROW_MV / 2, p.y0 + ROW_MV / 2), zorder=1)
        ax.plot(t, p.y0 + trace, color=TRACE_COLOR, linewidth=0.6, zorder=3)
        label = p.lead if math.isclose(p.t0, p.x0) else f"{p.lead} ({p.t0:g}-{p.t1:g} s)"
        ax.text(p.x0 + 0.04, p.y0 + ROW_MV * 0.3, label, fontsize=7, zorder=4,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1.0})
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    scale = ("10 mm/mV" if amplitude == "mV"
             else f"{Z_MV_PER_SD * MM_PER_MV:g} mm per SD (z-scored segments: amplitude standardised, not mV)")
    foot = f"25 mm/s, {scale}; {duration:g} s at {fs:g} Hz"
    if duration < RHYTHM_S:
        foot += "; shorter than 10 s: columns wrap (times in the panel labels)"
    if sal is not None:
        foot += "\noverlay: saliency (title), min-max scaled over the figure, darker = more"
    fig.text(margin_mm[0] / 25.4 / fig_w, 1.5 / 25.4 / fig_h, foot, fontsize=7, va="bottom")
    if title:
        fig.text(margin_mm[0] / 25.4 / fig_w, 1 - 8.0 / 25.4 / fig_h, title, fontsize=9)
    return fig


def save_figure(fig, path) -> None:
    """Write ``fig`` to ``path`` in the format its extension names (png/svg/pdf), atomically."""
    from pathlib import Path

    import matplotlib.pyplot as plt

    from ecgfm_cli.io.artifacts import atomic_path

    fmt = Path(path).suffix.lower().lstrip(".")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=fig.dpi)
    plt.close(fig)
