"""``ecgfm embed --features rhythm``: the classical-features branch of the embed command (ecgfm_cli/features.py)."""

from __future__ import annotations

import json

from ecgfm_cli.console import info, plural
from ecgfm_cli.errors import EcgfmError


def embed_features(out, output: str, input: str, kind: str, model: str | None, random_init: bool, pool: str,
                   leads: str | None, nan: str, procs: int, gpus: int) -> None:
    """Check the options of a features run, compute the features and say what was written."""
    from ecgfm_cli.contract import STANDARD_LEADS, canonical_lead
    from ecgfm_cli.features import (
        embedding_names,
        features_meta,
        lead_order,
        require_neurokit,
        run_features,
    )
    from ecgfm_cli.io.artifacts import open_artifact
    from ecgfm_cli.io.schema import segments_contract
    from ecgfm_cli.provenance import build_provenance

    if model is not None or random_init:
        raise EcgfmError("--features computes features without a model: leave out --model/--random-init")
    if gpus:
        raise EcgfmError("--features runs on CPU: use --procs N for several processes, not --gpus")
    if input == "-" and procs > 1:
        raise EcgfmError("--procs needs a file or directory input, not stdin")
    version = require_neurokit()
    reader = open_artifact(input, "segments", "embed")
    missing = [c for c in ("record_id", "patient_id", "segment_index", "signal", "lead_present")
               if c not in reader.schema.names]
    if missing:
        raise EcgfmError(f"{input}: not a segments artifact: no column(s) {', '.join(missing)}")
    try:
        contract = segments_contract(reader.metadata)
    except (ValueError, TypeError) as e:
        raise EcgfmError(f"{input}: unreadable ecgfm.contract metadata ({e})") from e
    n_leads = reader.schema.field("lead_present").type.list_size
    if contract is not None:
        names, fs = list(contract.leads), float(contract.sample_rate)
    elif n_leads == len(STANDARD_LEADS):
        names, fs = list(STANDARD_LEADS), 500.0
        info("embed: warning: the segments carry no ecgfm.contract metadata; assuming the standard 12-lead order "
             "at 500 Hz")
    else:
        raise EcgfmError(f"{input}: no ecgfm.contract metadata and {n_leads} leads: the lead order and sampling rate "
                         "are unknown")
    if len(names) != n_leads:
        raise EcgfmError(f"{input}: the contract names {len(names)} leads but the segments hold {n_leads}")
    preferred = None
    if leads is not None:
        preferred = []
        for item in (s.strip() for s in leads.split(",")):
            lead = canonical_lead(item) if item else None
            if item and (lead is None or lead not in names):
                raise EcgfmError(f"--leads: {item!r} is not one of the segments' leads ({', '.join(names)})")
            if lead:
                preferred.append(lead)
        if not preferred:
            raise EcgfmError("--leads: give at least one lead, e.g. --leads II")
    if reader.num_rows() == 0:
        raise EcgfmError(f"{input}: the input holds no segments")
    tried = [names[c] for c in lead_order(names, preferred)]
    settings = {"features": kind, "pool": pool, "leads": preferred, "nan": nan, "procs": procs}
    meta = {
        "contract": json.loads(reader.metadata.get("ecgfm.contract") or "null"),
        "model": features_meta(version, tried),
        "provenance": build_provenance({"segments": input}, extra=settings),
        "leads": preferred,
        "pool": pool,
        "features": embedding_names(),
    }
    summary = run_features(reader, out, meta, names, fs, preferred=preferred, pool=pool, nan=nan, procs=procs)
    what = "records" if pool == "record" else "segments"
    rate = summary.segments / summary.seconds if summary.seconds > 0 else float("nan")
    msg = (f"embed: {summary.rows} {what} x {summary.dim} rhythm features -> {output} ({summary.segments} segments "
           f"in {summary.seconds:.1f} s, {rate:.1f}/s; lead used: "
           f"{', '.join(f'{k} {v}' for k, v in summary.lead_used.items()) or 'none'})")
    if summary.no_lead:
        msg += f"; {plural(summary.no_lead, 'segment')} without a usable lead (all features missing)"
    if summary.nan_skipped:
        msg += (f"; {summary.nan_skipped} segment(s) with NaN/Inf skipped, e.g. "
                f"{'; '.join(summary.nan_examples)}")
    info(msg)
    undefined = {k: v for k, v in summary.missing.items() if v}
    if undefined:
        info(f"embed: features undefined (filled, *_missing = 1) in {what}: "
             + ", ".join(f"{k} {v}" for k, v in undefined.items()))
