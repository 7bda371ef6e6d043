"""``ecgfm explain``: 12-lead paper layout, grid geometry, saliency alignment (ecgfm_cli/explain.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import run_main as ecgfm
from conftest import segment_sample

from ecgfm_cli.contract import STANDARD_LEADS
from ecgfm_cli.explain import (
    MM_PER_MV,
    MM_PER_S,
    PAPER_ROWS,
    ROW_MV,
    attention_saliency,
    concat_segments,
    draw_paper,
    frames_to_samples,
    grad_x_input,
    normalise,
    paper_layout,
    paper_size_mm,
    receptive_field,
    save_figure,
    smooth,
)

pytest.importorskip("matplotlib")

ECG_FM_CONV = ((256, 2, 2),) * 4
MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF-", "svg": b"<?xml"}


def test_layout_standard_order_and_offsets():
    panels = paper_layout(10.0, STANDARD_LEADS)
    assert len(panels) == 13
    grid = {(p.y0, p.x0): p.lead for p in panels[:12]}
    for r, row in enumerate(PAPER_ROWS):
        for c, lead in enumerate(row):
            assert grid[(-ROW_MV * r, 2.5 * c)] == lead
    assert [p.lead for p in panels[:4]] == ["I", "aVR", "V1", "V4"]
    for p in panels[:12]:  # simultaneous time: each column shows the time of its place on the paper
        assert (p.t0, p.t1) == (p.x0, p.x0 + 2.5)
    strip = panels[12]
    assert (strip.lead, strip.x0, strip.t0, strip.t1, strip.y0) == ("II", 0.0, 0.0, 10.0, -3 * ROW_MV)
    assert paper_size_mm() == (250.0, 120.0)


def test_layout_short_signal_wraps_and_missing_leads_are_left_out():
    panels = paper_layout(5.0, STANDARD_LEADS)
    by_lead = {p.lead: p for p in panels[:12]}
    assert (by_lead["V1"].x0, by_lead["V1"].t0, by_lead["V1"].t1) == (5.0, 0.0, 2.5)
    assert (by_lead["V4"].x0, by_lead["V4"].t0) == (7.5, 2.5)
    assert panels[-1].t1 == 5.0
    only = paper_layout(10.0, ["I", "V2"])
    assert [p.lead for p in only] == ["I", "V2"]  # no lead II: no rhythm strip


def _figure(amplitude: str = "mV", saliency=None, n: int = 5000, offset: float = 0.0):
    # lead k: a 1 Hz square wave of amplitude (k + 1) * 0.05 (mV) about ``offset``, to tell the leads apart
    square = np.where((np.arange(n) // 250) % 2 == 0, 1.0, -1.0)
    sig = offset + ((np.arange(12) + 1) * 0.05)[:, None] * square[None, :]
    return draw_paper(sig, STANDARD_LEADS, 500.0, amplitude=amplitude, saliency=saliency, dpi=100)


def test_grid_is_25_mm_per_s_and_10_mm_per_mv():
    fig = _figure()
    ax = fig.axes[0]
    px_per_mm = fig.dpi / 25.4
    (x0, y0), (x1, y1) = ax.transData.transform([(0.0, 0.0), (1.0, 1.0)])
    assert (x1 - x0) / px_per_mm == pytest.approx(MM_PER_S, rel=1e-6)
    assert (y1 - y0) / px_per_mm == pytest.approx(MM_PER_MV, rel=1e-6)
    # major lines every 5 mm; major and minor together every 1 mm (matplotlib drops minors under majors)
    def inside(t, lim):
        return t[(t >= lim[0] - 1e-9) & (t <= lim[1] + 1e-9)]

    assert np.allclose(np.diff(inside(ax.get_xticks(), ax.get_xlim())), 5 / MM_PER_S)
    assert np.allclose(np.diff(inside(ax.get_yticks(), ax.get_ylim())), 5 / MM_PER_MV)
    all_x = np.unique(np.round(inside(np.concatenate([ax.get_xticks(), ax.xaxis.get_minorticklocs()]),
                                      ax.get_xlim()), 9))
    all_y = np.unique(np.round(inside(np.concatenate([ax.get_yticks(), ax.yaxis.get_minorticklocs()]),
                                      ax.get_ylim()), 9))
    assert len(all_x) == 251 and len(all_y) == 121  # 250 x 120 mm of 1 mm squares
    assert np.allclose(np.diff(all_x), 1 / MM_PER_S) and np.allclose(np.diff(all_y), 1 / MM_PER_MV)
    assert ax.get_xlim() == (0.0, 10.0)


def test_traces_are_drawn_where_the_layout_puts_them():
    fig = _figure()
    lines = fig.axes[0].get_lines()
    assert len(lines) == 13
    for line, p in zip(lines, paper_layout(10.0, STANDARD_LEADS), strict=True):
        x, y = line.get_xdata(), line.get_ydata()
        assert x[0] == pytest.approx(p.x0) and x[-1] == pytest.approx(p.x0 + (p.t1 - p.t0) - 1 / 500)
        amp = (STANDARD_LEADS.index(p.lead) + 1) * 0.05
        assert y.max() - y.min() == pytest.approx(2 * amp)  # the panel shows its own lead
        assert np.median(y) == pytest.approx(p.y0, abs=amp)  # about its baseline
    # a DC offset (unfiltered Holter leads) is removed per panel: the trace stays in its row
    shifted = _figure(offset=5.0).axes[0].get_lines()
    for a, b in zip(lines, shifted, strict=True):
        np.testing.assert_allclose(a.get_ydata(), b.get_ydata())
    # z-scored input is drawn at 2.5 mm per SD: 0.25 paper mV per unit
    z = _figure("z").axes[0].get_lines()[1]  # aVR: amplitude 0.2
    assert z.get_ydata().max() - z.get_ydata().min() == pytest.approx(2 * 0.2 * 0.25)


def test_absent_leads_get_an_empty_panel():
    sig = np.random.default_rng(0).normal(size=(12, 5000)) * 0.1
    sig[2:] = np.nan  # only I and II
    sal = np.ones(5000)
    fig = draw_paper(sig, STANDARD_LEADS, 500.0, saliency=sal, dpi=60)
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 3  # I, II and the rhythm strip
    assert len(ax.get_images()) == 3  # no overlay over an empty panel


def test_saliency_overlay_is_aligned_with_the_trace():
    sal = np.zeros((12, 5000))
    sal[:, 1250:1300] = 1.0  # 2.5-2.6 s: second column
    fig = _figure(saliency=sal)
    images = fig.axes[0].get_images()
    assert len(images) == 13
    img, p = images[1], paper_layout(10.0, STANDARD_LEADS)[1]  # aVR: x 2.5-5.0 s shows t 2.5-5.0 s
    left, right, bottom, top = img.get_extent()
    assert (left, right) == pytest.approx((p.x0, p.x0 + 2.5))
    data = np.ma.getdata(img.get_array())[0]
    assert data[:50].min() == 1.0 and data[50:].max() == 0.0


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_saved_files_are_valid(fmt, tmp_path):
    path = tmp_path / f"ecg.{fmt}"
    save_figure(_figure(), path)
    head = path.read_bytes()[:8]
    assert head.startswith(MAGIC[fmt])
    if fmt == "png":
        import matplotlib.image as mpimg

        assert mpimg.imread(path).shape[2] in (3, 4)


def test_receptive_field_arithmetic():
    assert receptive_field(ECG_FM_CONV) == (16, 16)
    assert receptive_field(((8, 3, 2), (8, 3, 2))) == (4, 7)  # 1 + 2 + 2 * 2
    assert receptive_field(((8, 10, 5), (8, 3, 2), (8, 2, 2))) == (20, 30)  # wav2vec-like: 1 + 9 + 2*5 + 1*10


def test_frames_to_samples_maps_a_frame_to_its_samples():
    v = np.zeros(156)
    v[10] = 1.0
    out = frames_to_samples(v, ECG_FM_CONV, 2500)
    assert np.flatnonzero(out == 1.0).tolist() == list(range(160, 176))
    assert np.isnan(out[2496:]).all() and np.isfinite(out[:2496]).all()  # the 4 samples no frame reads
    # overlapping fields: each sample is the mean of the frames that read it (brute force)
    conv = ((8, 3, 2), (8, 3, 2))
    rng = np.random.default_rng(0)
    length = 40
    t = (((length - 3) // 2 + 1) - 3) // 2 + 1
    vals = rng.normal(size=(2, t))
    got = frames_to_samples(vals, conv, length)
    jump, size = receptive_field(conv)
    for s in range(length):
        frames = [f for f in range(t) if f * jump <= s < f * jump + size]
        want = vals[:, frames].mean(axis=1) if frames else np.full(2, np.nan)
        np.testing.assert_allclose(got[:, s], want)


def test_attention_reductions():
    a = np.zeros((1, 3, 3))
    a[0, :, 2] = [0.5, 0.2, 0.9]  # every query puts this much on key 2
    a[0, :, 0] = 1 - a[0, :, 2]
    np.testing.assert_allclose(attention_saliency(a, "received")[0], [(0.5 + 0.8 + 0.1) / 3, 0, 1.6 / 3])
    np.testing.assert_allclose(attention_saliency(a, "seed")[0], [0.5, 0.8, 0.9])


def test_grad_x_input_peaks_at_the_only_weighted_sample():
    import torch

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.zeros(2, 3, 100)
            self.w[1, 1, 37] = 2.0  # logit 1 reads lead 1 at sample 37 only

        def forward(self, x):
            return torch.einsum("bcl,kcl->bk", x, self.w)

    x = np.random.default_rng(1).normal(size=(2, 3, 100)).astype(np.float32) + 3.0
    g = grad_x_input(Linear(), x, label=1)
    assert g.shape == (2, 3, 100)
    for s in range(2):
        assert np.unravel_index(np.abs(g[s]).argmax(), g[s].shape) == (1, 37)
        assert g[s, 1, 37] == pytest.approx(2.0 * x[s, 1, 37])
        assert np.count_nonzero(g[s]) == 1
    assert not grad_x_input(Linear(), x, label=1, lead_mask=np.array([True, False, True])).any()


def test_concat_segments_places_by_start_sample():
    v = np.stack([np.full((2, 4), 1.0), np.full((2, 4), 3.0)])
    np.testing.assert_allclose(concat_segments([0, 4], v)[0], [1, 1, 1, 1, 3, 3, 3, 3])
    np.testing.assert_allclose(concat_segments([0, 2], v)[0], [1, 1, 2, 2, 3, 3])  # overlap: mean
    gap = concat_segments([0, 6], v)[0]
    assert np.isnan(gap[4:6]).all()
    absent = v.copy()
    absent[:, 1] = np.nan  # an absent lead must not blank the others
    out = concat_segments([0, 4], absent)
    np.testing.assert_allclose(out[0], [1, 1, 1, 1, 3, 3, 3, 3])
    assert np.isnan(out[1]).all()


def test_smooth_and_normalise():
    x = np.zeros(11)
    x[5] = 3.0
    s = smooth(x, 3)
    np.testing.assert_allclose(s[4:7], [1.0, 1.0, 1.0])
    n = normalise(np.array([2.0, 4.0, np.nan]))
    np.testing.assert_allclose(n[:2], [0.0, 1.0])
    assert np.isnan(n[2])


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def data(sample_data, tmp_path_factory) -> dict[str, Path]:
    import torch

    from ecgfm_cli.model.checkpoint import make_config, save_checkpoint
    from ecgfm_cli.model.config import preset
    from ecgfm_cli.model.encoder import EcgClassifier

    root = tmp_path_factory.mktemp("explain")
    segment_sample(sample_data / "challenge2021", root, segments="seg.parquet")
    cfg = replace(preset("tiny"), feature_grad_mult=0.0)  # as finetune saves it: conv stack frozen
    torch.manual_seed(0)
    model = EcgClassifier(cfg, 2)
    save_checkpoint(root / "clf", model.state_dict(),
                    make_config("classifier", cfg, heads={"n_labels": 2, "final_dropout": 0.0}, labels=["AF", "RBBB"],
                                label_kinds={"AF": "binary", "RBBB": "binary"}))
    save_checkpoint(root / "enc", model.encoder.state_dict(), make_config("encoder", cfg))
    import pyarrow.parquet as pq

    rid = pq.read_table(root / "seg.parquet", columns=["record_id"]).column("record_id")[0].as_py()
    return {"rec": root / "records", "seg": root / "seg.parquet", "clf": root / "clf", "enc": root / "enc", "rid": rid}


def test_explain_cli_record_segment_and_saliency(data, tmp_path, capsys):
    out = tmp_path / "rec.png"
    code, err = ecgfm(capsys, "explain", data["rec"], "--record-id", data["rid"], "-o", out)
    assert code == 0, err
    assert out.read_bytes().startswith(MAGIC["png"])
    for method in ("attention", "gradxinput"):
        out = tmp_path / f"{method}.pdf"
        code, err = ecgfm(capsys, "explain", data["seg"], "--record-id", data["rid"], "-m", data["clf"],
                          "--label", "AF", "--saliency", method, "-o", out)
        assert code == 0, err
        assert out.read_bytes().startswith(MAGIC["pdf"])
    out = tmp_path / "seg.svg"
    code, err = ecgfm(capsys, "explain", data["seg"], "--record-id", data["rid"], "--segment-index", "0",
                      "-m", data["clf"], "--label", "RBBB", "--saliency", "gradxinput", "-o", out)
    assert code == 0, err and "segment 0" in err
    assert b"<svg" in out.read_bytes()[:400]


def test_explain_cli_start_draws_a_later_window(data, tmp_path, capsys):
    import matplotlib.image as mpimg

    seg_starts = [0.0, 5.0]
    pngs = []
    for start in seg_starts:
        out = tmp_path / f"s{start:g}.png"
        code, err = ecgfm(capsys, "explain", data["seg"], "--record-id", data["rid"], "--start", start, "-o", out)
        assert code == 0, err
        assert ("drawn from 5 s" in err) == (start == 5.0)
        pngs.append(mpimg.imread(out))
    assert not np.array_equal(pngs[0], pngs[1])
    code, err = ecgfm(capsys, "explain", data["rec"], "--record-id", data["rid"], "--start", 999, "-o",
                      tmp_path / "late.png")
    assert code == 2 and "s long" in err


def test_explain_cli_errors(data, tmp_path, capsys):
    rid = data["rid"]
    code, err = ecgfm(capsys, "explain", data["seg"], "--record-id", rid, "-o", tmp_path / "x.jpg")
    assert code == 2 and ".png, .svg or .pdf" in err
    code, err = ecgfm(capsys, "explain", data["seg"], "--record-id", "nope", "-o", tmp_path / "x.png")
    assert code == 2 and "no record with record_id 'nope'" in err
    code, err = ecgfm(capsys, "explain", data["seg"], "--record-id", rid, "-m", data["clf"], "-o", tmp_path / "x.png")
    assert code == 2 and "choose one of AF, RBBB" in err
    code, err = ecgfm(capsys, "explain", data["seg"], "--record-id", rid, "-m", data["enc"], "-o", tmp_path / "x.png")
    assert code == 2 and "no classifier head" in err
    code, err = ecgfm(capsys, "explain", data["rec"], "--record-id", rid, "-m", data["clf"], "-o", tmp_path / "x.png")
    assert code == 2 and "segments artifact" in err
    assert not list(tmp_path.iterdir())
