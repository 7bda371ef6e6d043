"""``ecgfm ingest``: raw ECG files -> records."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def ingest_command(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders, searched recursively: WFDB (.hea + .dat/.mat, "
                                                "incl. MIMIC-IV-ECG and PTB-XL layouts), CPSC-2018 .mat, ECG-FM .mat, "
                                                "HDF5 (CODE-15%, SPH), CSV/TXT tables (.gz allowed).")],
    output: Annotated[str | None, typer.Option("-o", "--output", help="DIR (Parquet shards), FILE.parquet, "
                                               "FILE.arrow, or - for an Arrow stream. Omitted: stream to stdout "
                                               "when it is a pipe.")] = None,
    workers: Annotated[int, typer.Option(help="Reader processes (pays only with idle cores to spare; on 2 cores "
                                         "it is slower).", min=1)] = 1,
    shard: Annotated[str, typer.Option(help="I/N: read only shard I of N (0-based, stable by file path), "
                                       "e.g. $SLURM_ARRAY_TASK_ID/64. A rerun skips finished shards.")] = "0/1",
    fs: Annotated[float | None, typer.Option(help="Sampling rate (Hz) of header-less files (CSV).")] = None,
    leads: Annotated[str | None, typer.Option(help="Comma-separated lead names of header-less CSV columns "
                                              "(default: I,II,III,aVR,aVL,aVF,V1-V6).")] = None,
    gain: Annotated[float | None, typer.Option(help="ADC units per mV of header-less integer CSV values.")] = None,
    labels: Annotated[Path | None, typer.Option(help="CSV/Parquet with a record_id column: your own label columns, "
                                                "joined into the labels table.")] = None,
    rejects: Annotated[Path | None, typer.Option(help="Where to write the rejects table (default: next to the "
                                                 "output; with a stream output, reasons go to stderr).")] = None,
    store_digital: Annotated[bool, typer.Option("--store-digital", help="Also keep lossless ADC integers with "
                                                "gain and baseline where the source has them.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit with status 1 if any file is rejected.")] = False,
    max_samples: Annotated[str, typer.Option("--max-samples", metavar="N", help="Reject a record longer than N "
                                             "samples per lead as too_large, checked before it is read (bounds "
                                             "memory per record); 0 or none: no bound.")] = "16777216",
    id_key: Annotated[Path | None, typer.Option("--id-key", help="Secret key file (16+ bytes) for hospital files' "
                                                "patient ids: the MRN becomes a keyed HMAC-SHA256 pseudonym, the "
                                                "same in every run with the same key. Without it patient_id is left "
                                                "empty (see docs/deidentification.md).")] = None,
    keep_identifiers: Annotated[bool, typer.Option("--keep-identifiers", help="Do NOT de-identify hospital files: "
                                                   "MRN as patient_id, names, birth dates, staff and free text in "
                                                   "comments, full dates.")] = False,
) -> None:
    """Find ECG records under PATHS and write one row per record (signal, leads, rate, metadata,
    per-lead quality flags), a labels table from the headers, and a rejects table."""
    from ecgfm_cli.console import info
    from ecgfm_cli.errors import EcgfmError
    from ecgfm_cli.ingest import IngestOptions, check_user_labels, parse_max_samples, parse_shard, report, run_ingest
    from ecgfm_cli.io.artifacts import discard_empty_output, resolve_output
    from ecgfm_cli.io.readers import ReadOptions

    out = resolve_output(output, ("stream", "dir", "parquet", "arrow"), "ingest", companions=True)
    shard_t = parse_shard(shard)
    if shard_t[1] > 1 and out.format != "dir":
        raise EcgfmError("--shard needs -o DIR: each shard writes its own files into the directory")
    if labels is not None and not labels.is_file():
        raise EcgfmError(f"--labels {labels}: no such file")
    if rejects is not None and shard_t[1] > 1:
        raise EcgfmError("--rejects with --shard: every shard writes its own rejects table beside the output; leave "
                         "--rejects out")
    if gain is not None and not gain > 0:
        raise EcgfmError(f"--gain {gain}: expected ADC units per mV, a positive number")
    if fs is not None and not (0 < fs <= 20000):
        raise EcgfmError(f"--fs {fs}: expected a sampling rate in Hz (0 < fs <= 20000)")
    lead_list = [s.strip() for s in leads.split(",")] if leads else None
    from ecgfm_cli.deid import DeidPolicy, read_id_key

    if id_key is not None and keep_identifiers:
        raise EcgfmError("--id-key with --keep-identifiers: the one pseudonymises patient ids, the other keeps them; "
                         "choose one")
    try:
        key = read_id_key(id_key) if id_key is not None else None
    except (OSError, ValueError) as e:
        raise EcgfmError(str(e) if isinstance(e, ValueError) else f"--id-key {id_key}: {e.strerror or e}") from e
    if keep_identifiers:
        info("ingest: WARNING --keep-identifiers: hospital files' patient names, MRNs, birth dates, staff names and "
             "free text go into the outputs un-redacted")
    opts = IngestOptions(read=ReadOptions(fs=fs, leads=lead_list, gain=gain, store_digital=store_digital,
                                          max_samples=parse_max_samples(max_samples)),
                         workers=workers, shard=shard_t, strict=strict, labels_csv=labels, rejects_path=rejects,
                         deid=DeidPolicy(key=key, keep_identifiers=keep_identifiers))
    if labels is not None:
        check_user_labels(labels)  # before reading every record, not after
    summary = run_ingest(paths, out, opts)
    if summary.skipped_shard:
        return
    info(report(summary, out, rejects))
    if summary.records == 0 and summary.files == 0 and summary.found and shard_t[1] > 1:
        info(f"ingest: shard {shard} holds none of the {summary.found} files found; nothing to do")
        return
    if summary.records == 0:
        discard_empty_output(out, shard_t)
        raise EcgfmError("no record was read" + (f": every file was rejected, e.g. {summary.reject_example} (all "
                                                 "reasons in the rejects table)" if summary.rejected
                                                 else f" under {', '.join(map(str, paths))}: no ECG files found"))
    if strict and summary.rejected:
        raise typer.Exit(1)
