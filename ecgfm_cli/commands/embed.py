"""``ecgfm embed``: segments -> mean-pooled ECG-FM encoder embeddings (Parquet or NPZ)."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from ecgfm_cli.commands.options import AllowPartial, Device, Gpus, PresetName, Procs, Threads, UnsafePickle


def embed_command(
    output: Annotated[str, typer.Option("-o", "--output", help="DIR (Parquet shards), FILE.parquet or FILE.npz.")],
    input: Annotated[str, typer.Argument(help="Segments from `ecgfm segment`: DIR, FILE.parquet/.arrow, or - "
                                         "(stdin stream, the default).")] = "-",
    model: Annotated[str | None, typer.Option("--model", "-m", help="Checkpoint: an ecgfm checkpoint directory or "
                                              "an official ECG-FM fairseq .pt (pretrained or finetuned).")] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="Embed with a randomly initialised encoder "
                                              "(--preset, --seed) instead of --model: the baseline a probe "
                                              "should beat.")] = False,
    preset: Annotated[PresetName, typer.Option(help="Encoder size for --random-init: base, large, small or "
                                               "tiny.", metavar="NAME")] = "base",
    seed: Annotated[int, typer.Option(help="Seed of the --random-init weights.")] = 0,
    pool: Annotated[Literal["segment", "record"], typer.Option(
        help="segment: one embedding per segment; record: also average each record's segments (one row per record, "
        "segment_index -1).")] = "segment",
    leads: Annotated[str | None, typer.Option(help="Keep only these leads, e.g. I,II (every other lead is "
                                              "zeroed; recorded in the output metadata).")] = None,
    nan: Annotated[Literal["refuse", "skip"], typer.Option(
        help="Segments holding NaN/Inf: refuse (error naming them) or skip (leave them out, counted).")] = "refuse",
    device: Device = "auto",
    dtype: Annotated[Literal["float32", "bfloat16"], typer.Option(
        help="float32, or bfloat16 (torch.autocast: faster, cosine > 0.9999 to float32).")] = "float32",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Segments per forward pass.", min=1)] = 32,
    threads: Threads = None,
    gpus: Gpus = None,
    procs: Procs = None,
    features: Annotated[Literal["rhythm"] | None, typer.Option(
        "--features", help="rhythm: classical features instead of a model (heart rate, R-R irregularity, QRS/PR/QT; "
        "neurokit2), the baseline a model should beat. --leads: the leads to try, in order (default II "
        "first).")] = None,
    shard: Annotated[str, typer.Option(help="I/N: embed only part I of the input's N equal parts into -o DIR, "
                                       "e.g. $SLURM_ARRAY_TASK_ID/64; the N shard jobs, in any order, write the "
                                       "artifact one job would. A rerun skips finished shards.")] = "0/1",
    unsafe_pickle: UnsafePickle = False,
    allow_partial: AllowPartial = False,
) -> None:
    """One mean-pooled embedding (768-d for the base model) per 5 s segment, keyed by record_id,
    patient_id and segment_index, as ECG-FM's linear-probing features."""
    from ecgfm_cli.errors import EcgfmError
    from ecgfm_cli.io.artifacts import resolve_output

    out = resolve_output(output, ("dir", "parquet", "npz"), "embed")
    from ecgfm_cli.ingest import parse_shard

    shard_t = parse_shard(shard)
    if shard_t[1] > 1:
        if out.format != "dir" or input == "-":
            raise EcgfmError("--shard splits a segments file or directory among jobs: give it as input (not stdin) "
                             "and -o DIR (each shard writes its own files there)")
        if features is not None:
            raise EcgfmError("--shard with --features: rhythm features are computed in one job; leave --shard out")
        from ecgfm_cli.io.artifacts import done_marker

        marker = done_marker(out.path, shard_t)
        if marker.exists():  # before loading anything: a rerun of a SLURM array skips its finished tasks at once
            from ecgfm_cli.console import info

            info(f"embed: shard {shard_t[0]}/{shard_t[1]} is already complete in {out.path}; nothing to do (delete "
                 f"{marker} to redo it)")
            return
    if features is not None:
        from ecgfm_cli.commands._embed_features import embed_features

        embed_features(out, output, input, features, model, random_init, pool, leads, nan, procs or 1, gpus or 0)
        return
    if (model is None) == (not random_init):
        raise EcgfmError("give exactly one of --model CKPT and --random-init")
    if input == "-" and max(gpus or 0, procs or 0) > 1:
        raise EcgfmError("--gpus/--procs need a file or directory input, not stdin")

    from ecgfm_cli.embed import EmbedOptions, ModelSpec, check_input, load_model, parse_leads, run_embed
    from ecgfm_cli.io.artifacts import open_artifact
    from ecgfm_cli.model.checkpoint import CheckpointError
    from ecgfm_cli.provenance import build_provenance
    from ecgfm_cli.train.distributed import resolve_device

    device, nproc = resolve_device(device, gpus, procs)  # the rule of pretrain and finetune
    gpus, procs = (nproc if gpus is not None else 0), (nproc if device == "cpu" else 1)

    spec = ModelSpec(checkpoint=model, allow_pickle=unsafe_pickle, preset=preset if random_init else None,
                     seed=seed)
    try:
        loaded = load_model(spec)
    except CheckpointError as e:
        raise EcgfmError(f"--model: {e}") from e
    reader = open_artifact(input, "segments", "embed")
    warnings = check_input(reader.schema, reader.metadata, loaded)
    lead_names, _ = parse_leads(leads, loaded.contract)
    from ecgfm_cli.console import info

    trained_on = (loaded.meta.get("source") or {}).get("input_leads")
    if leads is None and trained_on and list(trained_on) != list(loaded.contract.leads):
        warnings.append(f"the model was finetuned on leads {','.join(trained_on)} (the others zeroed); pass "
                        f"--leads {','.join(trained_on)} to embed as it saw the data")
    for w in warnings:
        info(f"embed: warning: {w}")
    if reader.num_rows() == 0:
        raise EcgfmError(f"{input}: the input holds no segments")

    opts = EmbedOptions(batch_size=batch_size, device=device, dtype=dtype, pool=pool, leads=leads, nan=nan,
                        threads=threads)
    import json

    contract = json.loads(reader.metadata.get("ecgfm.contract") or loaded.contract.to_json())
    settings = {"pool": pool, "leads": lead_names, "dtype": dtype, "device": device, "batch_size": batch_size,
                "nan": nan, "gpus": gpus, "procs": procs}
    meta = {
        "contract": contract,
        "model": loaded.meta,
        "provenance": build_provenance({"segments": input, "model": model},
                                       seed=seed if random_init else None, extra=settings),
        "leads": lead_names,
        "pool": pool,
    }
    from ecgfm_cli.io.artifacts import output_lock

    if shard_t[1] > 1:
        from ecgfm_cli.embed import check_sibling_shards
        from ecgfm_cli.io.artifacts import check_output_kind, start_shard

        check_output_kind(out.path, "embeddings", "embed")
        # before the shard is locked: a refused job leaves nothing behind
        check_sibling_shards(out.path, shard_t, reader.num_rows() or 0, meta,
                             batch_size if pool == "segment" else None)
        if not start_shard(out, shard_t, "embed", "embeddings"):
            return
    # a shard run holds its shard's lock since start_shard; one run of the whole output locks all of it
    with output_lock(out, shard_t if shard_t[1] > 1 else None, "embed", "embeddings"):
        summary = run_embed(input, reader, out, spec, loaded, opts, meta, gpus=gpus, procs=procs, shard=shard_t)
    what = "records" if pool == "record" else "segments"
    part = f" (shard {shard_t[0]}/{shard_t[1]})" if shard_t[1] > 1 else ""
    msg = f"embed: {summary.rows} {what} x {summary.dim} -> {output}{part}"
    if summary.nan_skipped:
        msg += (f" ({summary.nan_skipped} segment(s) with NaN/Inf skipped, e.g. "
                f"{'; '.join(summary.nan_examples)})")
    info(msg)
