"""``ecgfm segment``: records -> 5 s model-input windows (ECG-FM preprocessing)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from ecgfm_cli.commands.options import AllowPartial


def segment_command(
    input: Annotated[str, typer.Argument(help="records from `ecgfm ingest`: DIR, FILE.parquet/.arrow, or - "
                                         "(stdin stream, the default).")] = "-",
    output: Annotated[str | None, typer.Option("-o", "--output", help="DIR (Parquet shards), FILE.parquet, "
                                               "FILE.arrow, or - (stream).")] = None,
    seconds: Annotated[float, typer.Option(help="Window length in seconds.", min=0.1)] = 5.0,
    sample_rate: Annotated[int, typer.Option("--sample-rate", help="Resample every record to this rate (Hz).",
                                             min=1)] = 500,
    stride: Annotated[float | None, typer.Option(help="Seconds between window starts (default: --seconds, "
                                                 "i.e. non-overlapping, as ECG-FM). Smaller values give "
                                                 "overlapping inference windows.")] = None,
    lead_map: Annotated[list[str] | None, typer.Option("--lead-map", help="NAME=LEAD: treat stored lead NAME as "
                                                       "standard LEAD, e.g. --lead-map ECG=I (repeatable).")] = None,
    nan: Annotated[Literal["zero", "drop"], typer.Option(
        help="A lead holding NaN: 'zero' (zero it, flag it in lead_present) or 'drop' (reject the record, as ECG-FM's "
        "training splits do).")] = "zero",
    pad: Annotated[bool, typer.Option("--pad", help="Zero-pad records shorter than one window instead of "
                                      "rejecting them.")] = False,
    dtype: Annotated[Literal["float32", "float16"], typer.Option(
        help="Sample type of the windows: float32 or float16.")] = "float32",
    shard: Annotated[str, typer.Option(help="I/N: process only every N-th input file starting at I.")] = "0/1",
    workers: Annotated[int, typer.Option(help="Worker processes (pays only with idle cores to spare; on 2 cores "
                                         "it is slower).",
                                         min=1)] = 1,
    rejects: Annotated[Path | None, typer.Option(help="Where to write the rejects table (default: next to "
                                                 "the output).")] = None,
    allow_partial: AllowPartial = False,
) -> None:
    """Reorder leads by name to I..V6 (absent leads zero-filled and flagged), resample linearly to
    500 Hz, z-score each lead over the whole record, cut non-overlapping 5 s windows."""
    from ecgfm_cli.console import info, plural
    from ecgfm_cli.contract import STANDARD_LEADS
    from ecgfm_cli.errors import EcgfmError
    from ecgfm_cli.ingest import parse_shard
    from ecgfm_cli.io.artifacts import discard_empty_output, open_artifact, resolve_output
    from ecgfm_cli.preprocess import SegmentOptions
    from ecgfm_cli.segment import report, run_segment

    out = resolve_output(output, ("stream", "dir", "parquet", "arrow"), "segment", companions=True)
    pairs = []
    for item in lead_map or []:
        name, sep, lead = item.partition("=")
        if not sep or not name or lead.strip().upper() not in {x.upper() for x in STANDARD_LEADS}:
            raise EcgfmError(f"--lead-map {item!r}: expected NAME=LEAD with LEAD one of {', '.join(STANDARD_LEADS)}")
        pairs.append((name, lead))
    window = round(seconds * sample_rate)
    step = round((stride if stride is not None else seconds) * sample_rate)
    if step < 1:
        raise EcgfmError(f"--stride {stride}: must be at least one sample")
    shard_t = parse_shard(shard)
    if shard_t[1] > 1 and (out.format != "dir" or input == "-" or not Path(input).is_dir()):
        raise EcgfmError("--shard splits a directory of record shards among runs: give a records directory as input "
                         "and -o DIR (each shard writes its own files there)")
    if rejects is not None and shard_t[1] > 1:
        raise EcgfmError("--rejects with --shard: every shard writes its own rejects table beside the output; leave "
                         "--rejects out")
    reader = open_artifact(input, "records", "segment")
    opts = SegmentOptions(sample_rate=sample_rate, window=window, stride=step, lead_map=tuple(pairs), nan=nan,
                          pad=pad)
    summary = run_segment(reader, out, opts, dtype=dtype, shard=shard_t, rejects_path=rejects, workers=workers)
    if summary.skipped_shard:
        return
    if summary.found and not summary.files:
        info(f"segment: shard {shard} holds none of the {plural(summary.found, 'records file')}; nothing to do")
        return
    info(report(summary, out))
    if summary.segments == 0:
        discard_empty_output(out, shard_t)
        raise EcgfmError("no segment was written" + (f": every record was rejected, e.g. {summary.reject_example} (all "
                                                     "reasons in the rejects table)" if summary.rejects
                                                     else ": the input holds no records"))
