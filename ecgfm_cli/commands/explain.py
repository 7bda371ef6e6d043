"""``ecgfm explain``: a record or segment on 12-lead ECG paper (PNG/SVG/PDF), optionally with saliency."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from ecgfm_cli.commands.options import UnsafePickle


def explain_command(
    input: Annotated[str, typer.Argument(help="A records artifact (`ecgfm ingest`: physical mV) or a segments "
                                         "artifact (`ecgfm segment`: z-scored; needed for saliency).")],
    record_id: Annotated[str, typer.Option("--record-id", help="The record to draw.")],
    output: Annotated[str, typer.Option("-o", "--output", help="FILE.png, FILE.svg or FILE.pdf.")],
    segment_index: Annotated[int | None, typer.Option("--segment-index", help="Segments input: draw only this "
                                                      "segment (default: the record's segments end to end).")] = None,
    start: Annotated[float, typer.Option(help="First second of the record to draw (the paper holds 10 s).",
                                         min=0.0)] = 0.0,
    model: Annotated[str | None, typer.Option("--model", "-m", help="A finetuned classifier checkpoint "
                                              "(`ecgfm finetune` output): draw its saliency for --label.")] = None,
    label: Annotated[str | None, typer.Option(help="The classifier output to explain (default: its only "
                                              "label).")] = None,
    saliency: Annotated[Literal["attention", "gradxinput"], typer.Option(
        help="attention: last-layer attention, averaged over heads; gradxinput: gradient x input of the label's "
        "logit.")] = "attention",
    attention: Annotated[Literal["received", "seed"], typer.Option(
        help="How --saliency attention reduces the (query x key) map: received (mean over queries: attention each "
        "time gets) or seed (ECG-FM's script: max over keys per query).")] = "received",
    smooth_ms: Annotated[float, typer.Option("--smooth-ms", help="Moving average of gradient x input for display "
                                             "(ms; 0 = raw).", min=0)] = 40.0,
    unsafe_pickle: UnsafePickle = False,
) -> None:
    """Draw a record or segment on standard 12-lead ECG paper (PNG/SVG/PDF), optionally with a classifier's saliency.

    3 x 4 panels of 2.5 s (I, aVR, V1, V4 / II, aVL, V2, V5 / III, aVF, V3, V6) and a 10 s lead II rhythm strip,
    25 mm/s, 10 mm/mV, on a 1 mm / 5 mm grid; with --model, the saliency for --label as a heat overlay aligned in
    time with the trace."""
    from ecgfm_cli.console import info
    from ecgfm_cli.errors import EcgfmError
    from ecgfm_cli.explain import FORMATS, RHYTHM_S, normalise

    fmt = Path(output).suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise EcgfmError(f"-o {output}: the extension decides the format: .png, .svg or .pdf")
    if model is None and label is not None:
        raise EcgfmError("--label needs --model (the classifier whose output to explain)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise EcgfmError("explain needs matplotlib, which is not installed: pip install ecgfm-cli[plots]") from None
    from ecgfm_cli.io.artifacts import check_writable_dir

    check_writable_dir(Path(output).resolve().parent, f"-o {output}")
    kind = _artifact_kind(input)
    if kind not in ("records", "segments"):
        raise EcgfmError(f"{input}: expected a records or segments artifact, found {kind or 'neither'}")
    if model is not None and kind != "segments":
        raise EcgfmError("saliency needs the model's input: pass the segments artifact (`ecgfm segment`) of the record")
    if kind == "records" and segment_index is not None:
        raise EcgfmError("--segment-index needs a segments artifact")
    if start and segment_index is not None:
        raise EcgfmError("give --start (a 10 s window of the record) or --segment-index (one segment), not both")
    if kind == "records":
        signal, leads, fs, what = _record_signal(input, record_id)
        amplitude, overlay, overlay_label = "mV", None, ""
        a = int(round(start * fs))
        if a >= signal.shape[1]:
            raise EcgfmError(f"--start {start:g}: record {record_id!r} is {signal.shape[1] / fs:g} s long")
        signal = signal[:, a:a + int(round(RHYTHM_S * fs))]
    else:
        signal, leads, fs, what, seg = _segment_signal(input, record_id, segment_index, start)
        amplitude, overlay, overlay_label = "z", None, ""
        c0, c1 = seg["crop"]
        signal = signal[:, c0:c1]
        if model is not None:
            values, overlay_label = _saliency(model, unsafe_pickle, label, saliency, attention, smooth_ms, seg)
            overlay = normalise(values[..., c0:c1])  # scaled over what is drawn
    if start:
        what += f", drawn from {start:g} s"
    from ecgfm_cli.explain import draw_paper, save_figure

    fig = draw_paper(signal, leads, fs, title=what + (f" - {overlay_label}" if overlay_label else ""),
                     amplitude=amplitude, saliency=overlay, saliency_label=overlay_label)
    save_figure(fig, output)
    info(f"explain: {what} -> {output}")


def _artifact_kind(path: str) -> str | None:
    """The ``ecgfm.kind`` of a Parquet/Arrow file or of a shard directory's files (None if not found)."""
    from ecgfm_cli.errors import EcgfmError
    from ecgfm_cli.io.tables import read_schema

    p = Path(path)
    if not p.exists():
        raise EcgfmError(f"{path}: no such file or directory")
    files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
    for f in files:
        if f.name.startswith(("labels-", "rejects-")):
            continue
        kind = (read_schema(f).metadata or {}).get(b"ecgfm.kind")
        if kind:
            return kind.decode()
    return None


def _rows_of(input: str, kind: str, record_id: str, columns: list[str]):
    import pyarrow as pa
    import pyarrow.compute as pc

    from ecgfm_cli.io.artifacts import open_artifact

    reader = open_artifact(input, kind, "explain")
    wanted = [c for c in columns if c in reader.schema.names]
    parts = []
    for b in reader.iter_batches(wanted, batch_size=1024):
        m = pc.equal(b.column("record_id"), record_id)
        if pc.any(m).as_py():
            parts.append(b.filter(m))
    if not parts:
        from ecgfm_cli.errors import EcgfmError

        raise EcgfmError(f"{input}: no record with record_id {record_id!r}")
    return reader, pa.Table.from_batches(parts)


def _record_signal(input: str, record_id: str):
    """(signal (12, N) mV, standard lead names, fs, description) of one record of a records artifact; leads the
    record lacks are NaN (drawn empty)."""
    import numpy as np

    from ecgfm_cli.console import info
    from ecgfm_cli.contract import STANDARD_LEADS, canonical_lead, is_inverted
    from ecgfm_cli.io.schema import iter_records

    _, table = _rows_of(input, "records", record_id, ["record_id", "patient_id", "sample_rate", "n_samples",
                                                     "n_leads", "leads", "units", "signal", "digital", "gain",
                                                     "baseline"])
    rec = next(iter_records(table.combine_chunks().to_batches()[0]))
    units = rec.row.get("units") or [""] * len(rec.leads)
    out = np.full((len(STANDARD_LEADS), rec.signal.shape[1]), np.nan)
    odd = []
    for i, name in enumerate(rec.leads):
        lead = canonical_lead(name)
        if lead is None:
            continue
        x = rec.signal[i].astype(np.float64) * (-1.0 if is_inverted(name) else 1.0)
        unit = (units[i] or "").strip().lower()
        if unit in ("uv", "µv", "microvolt"):
            x = x / 1000.0
        elif unit not in ("mv", "", "millivolt"):
            odd.append(f"{name} ({units[i]})")
        out[STANDARD_LEADS.index(lead)] = x
    if odd:
        info(f"explain: warning: lead(s) {', '.join(odd)} are not in mV; drawn as stored")
    what = f"{record_id} ({rec.signal.shape[1] / rec.sample_rate:g} s)"
    return out, list(STANDARD_LEADS), float(rec.sample_rate), what


def _segment_signal(input: str, record_id: str, segment_index: int | None, start: float = 0.0):
    """(signal (C, N) z-scored, contract leads, fs, description, segments dict for saliency). Without
    ``segment_index``, only the segments overlapping the 10 s from ``start`` s are kept; ``crop`` (in the dict):
    the sample range of the returned signal to draw."""
    import numpy as np

    from ecgfm_cli.contract import STANDARD_LEADS
    from ecgfm_cli.errors import EcgfmError
    from ecgfm_cli.explain import RHYTHM_S, concat_segments
    from ecgfm_cli.io.schema import segment_signals, segments_contract

    reader, table = _rows_of(input, "segments", record_id, ["record_id", "segment_index", "start_sample", "signal",
                                                            "lead_present"])
    contract = segments_contract(reader.metadata)
    leads = list(contract.leads) if contract is not None else list(STANDARD_LEADS)
    fs = float(contract.sample_rate) if contract is not None else 500.0
    seg_idx = table.column("segment_index").to_numpy()
    if segment_index is not None:
        keep = np.flatnonzero(seg_idx == segment_index)
        if not len(keep):
            raise EcgfmError(f"record {record_id!r} has no segment {segment_index} (it has "
                             f"{', '.join(map(str, seg_idx[:10]))})")
        table = table.take(keep)
    table = table.combine_chunks()
    x = np.asarray(segment_signals(table), dtype=np.float32)
    if x.shape[1] != len(leads):
        raise EcgfmError(f"{input}: segments hold {x.shape[1]} leads, the contract names {len(leads)}")
    present = np.stack(table.column("lead_present").to_numpy(zero_copy_only=False)).astype(bool)
    starts = (table.column("start_sample").to_numpy().astype(np.int64) if "start_sample" in table.column_names
              else np.arange(len(x)) * x.shape[2])
    order = np.argsort(starts, kind="stable")
    x, present, starts = x[order], present[order], starts[order]
    a, width = int(round(start * fs)), int(round(RHYTHM_S * fs))
    if segment_index is None:
        keep = (starts < a + width) & (starts + x.shape[2] > a)
        if not keep.any():
            raise EcgfmError(f"--start {start:g}: record {record_id!r} has segments up to "
                             f"{(starts.max() + x.shape[2]) / fs:g} s")
        x, present, starts = x[keep], present[keep], starts[keep]
    a -= int(starts[0])
    starts = starts - starts[0]
    shown = np.where(present[:, :, None], x, np.nan)  # absent leads are drawn empty, not as a flat line
    signal = concat_segments(starts, shown)
    what = (f"{record_id} segment {segment_index}" if segment_index is not None
            else f"{record_id} ({len(x)} segment{'s' if len(x) != 1 else ''}, {signal.shape[1] / fs:g} s)")
    seg = {"x": x, "starts": starts, "contract": contract, "n": signal.shape[1], "fs": fs, "crop": (a, a + width)}
    return signal, leads, fs, what, seg


def _saliency(model: str, unsafe_pickle: bool, label: str | None, method: str, reduce: str, smooth_ms: float,
              seg: dict):
    """(raw saliency over the concatenated segments: (C, N) for gradxinput, (N,) for attention; its description).
    Only the segments in ``seg`` (those of the drawn 10 s) go through the model."""
    from dataclasses import replace

    import numpy as np
    import torch

    from ecgfm_cli.contract import check_compatible
    from ecgfm_cli.errors import EcgfmError
    from ecgfm_cli.explain import (
        attention_saliency,
        concat_segments,
        frames_to_samples,
        grad_x_input,
        smooth,
    )
    from ecgfm_cli.model.checkpoint import CheckpointError, build_classifier, load_checkpoint

    try:
        loaded = load_checkpoint(model, allow_pickle=unsafe_pickle)
    except CheckpointError as e:
        raise EcgfmError(f"--model: {e}") from e
    if loaded.kind != "classifier":
        raise EcgfmError(f"--model: a {loaded.kind} checkpoint has no classifier head; saliency needs a finetuned "
                         "classifier (`ecgfm finetune` output)")
    labels = list(loaded.labels or [f"output{i}" for i in range(int(loaded.state_dict["proj.bias"].shape[0]))])
    if label is None:
        if len(labels) != 1:
            raise EcgfmError(f"--label: the classifier has {len(labels)} outputs; choose one of "
                             f"{', '.join(labels[:20])}")
        label = labels[0]
    if label not in labels:
        raise EcgfmError(f"--label {label!r}: not an output of the classifier ({', '.join(labels[:20])})")
    if seg["contract"] is not None:
        check_compatible(seg["contract"], loaded.contract)
    cfg = loaded.encoder_config
    x = seg["x"]
    if x.shape[1:] != (cfg.in_channels, loaded.contract.window):
        raise EcgfmError(f"segments are {x.shape[1]} x {x.shape[2]}, the model takes {cfg.in_channels} x "
                         f"{loaded.contract.window}")
    # gradients must reach the input: finetuned checkpoints freeze the conv stack (feature_grad_mult 0, no_grad)
    loaded = replace(loaded, encoder_config=replace(cfg.with_dropouts(0.0), feature_grad_mult=1.0))
    net = build_classifier(loaded).eval()
    trained_on = (loaded.config.get("source") or {}).get("input_leads")
    mask = np.array([lead in trained_on for lead in loaded.contract.leads]) if trained_on else None
    j = labels.index(label)
    if method == "gradxinput":
        per = np.abs(grad_x_input(net, x, j, mask))  # (S, C, L)
        width = int(round(smooth_ms / 1000 * seg["fs"]))
        values = smooth(concat_segments(seg["starts"], per, seg["n"]), width)
        desc = f"|gradient x input| of {label!r}" + (f" ({smooth_ms:g} ms moving average)" if width > 1 else "")
    else:
        xt = torch.from_numpy(x if mask is None else x * mask[None, :, None].astype(np.float32))
        with torch.inference_mode():
            _, att = net.encoder.forward_with_attention(xt)
        frames = attention_saliency(att[:, -1].float().numpy(), reduce)  # (S, T)
        per = frames_to_samples(frames, cfg.conv_layers, x.shape[2])
        values = concat_segments(seg["starts"], per, seg["n"])
        desc = f"last-layer attention ({reduce}) of the {label!r} classifier"
    with torch.inference_mode():
        xt = torch.from_numpy(x if mask is None else x * mask[None, :, None].astype(np.float32))
        p = torch.sigmoid(net(xt)[:, j]).numpy()
    kinds = loaded.label_kinds or {}
    if kinds.get(label, "binary") == "binary":
        desc += f"; P({label}) per segment " + ", ".join(f"{v:.2f}" for v in p[:8]) + (" ..." if len(p) > 8 else "")
    return values, desc
