"""``ecgfm convert``: an official ECG-FM fairseq-signals ``.pt`` -> the project's checkpoint directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ecgfm_cli.commands.options import UnsafePickle

#: The 17 MIMIC-IV-ECG labels of ``mimic_iv_ecg_finetuned.pt``, in its logit order (ECG-FM's label_def.csv).
MIMIC_IV_ECG_LABELS: tuple[str, ...] = (
    "Poor data quality",
    "Sinus rhythm",
    "Premature ventricular contraction",
    "Tachycardia",
    "Ventricular tachycardia",
    "Supraventricular tachycardia with aberrancy",
    "Atrial fibrillation",
    "Atrial flutter",
    "Bradycardia",
    "Accessory pathway conduction",
    "Atrioventricular block",
    "1st degree atrioventricular block",
    "Bifascicular block",
    "Right bundle branch block",
    "Left bundle branch block",
    "Infarction",
    "Electronic pacemaker",
)


def challenge2021_labels() -> list[str]:
    """The 26 scored PhysioNet/CinC Challenge 2021 classes (equivalent codes merged), in file order of
    ``ecgfm_cli/data/challenge2021_scored.csv``: the packaged label map's labels."""
    from ecgfm_cli.labels import load_label_map

    return list(load_label_map("challenge2021").labels)


def resolve_labels(spec: str) -> list[str]:
    """``--labels`` -> label names: ``mimic-iv-ecg`` (17), ``challenge2021`` (26), a file (one name per line;
    a ``.csv`` with a ``label``/``name`` column, or its first column), or a comma-separated list."""
    if spec == "mimic-iv-ecg":
        return list(MIMIC_IV_ECG_LABELS)
    if spec == "challenge2021":
        return challenge2021_labels()
    p = Path(spec)
    if p.is_file():
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        lines = [ln for ln in lines if not ln.startswith("#")]
        if p.suffix.lower() == ".csv" and lines:
            import csv

            rows = list(csv.reader(lines))
            header = [h.strip().lower() for h in rows[0]]
            col = next((header.index(c) for c in ("label", "name") if c in header), None)
            return [r[col if col is not None else 0].strip() for r in rows[1 if col is not None else 0:] if r]
        return lines
    return [s.strip() for s in spec.split(",") if s.strip()]


def convert_command(
    checkpoint: Annotated[Path, typer.Argument(help="Official ECG-FM checkpoint (.pt from fairseq-signals), e.g. "
                                               "mimic_iv_ecg_physionet_pretrained.pt or mimic_iv_ecg_finetuned.pt.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint directory to write "
                                         "(model.safetensors + config.json).")],
    labels: Annotated[str | None, typer.Option(help="Names of a finetuned model's outputs: mimic-iv-ecg (the 17 "
                                               "labels of mimic_iv_ecg_finetuned.pt), challenge2021 (the 26 "
                                               "scored classes, for physionet_finetuned.pt), a file with one "
                                               "name per line, or NAME,NAME,...")] = None,
    unsafe_pickle: UnsafePickle = False,
) -> None:
    """Convert an official ECG-FM checkpoint into ecgfm's own format (safetensors + config.json with the
    encoder config, preprocessing contract, label names and the source file's sha256)."""
    from ecgfm_cli.console import info
    from ecgfm_cli.errors import EcgfmError

    if not checkpoint.exists():
        raise EcgfmError(f"{checkpoint}: no such file")
    if output.exists() and not output.is_dir():
        raise EcgfmError(f"-o {output}: exists and is not a directory")
    names = resolve_labels(labels) if labels is not None else None
    if labels is not None and not names:
        raise EcgfmError(f"--labels {labels!r}: no label names found")

    from ecgfm_cli.model.checkpoint import convert_fairseq, load_checkpoint

    try:
        if names is not None:
            probe = load_checkpoint(checkpoint, allow_pickle=unsafe_pickle)
            if probe.kind != "classifier":
                raise EcgfmError(f"--labels: {checkpoint} is a {probe.kind} checkpoint, not a finetuned classifier")
            n = int(probe.state_dict["proj.weight"].shape[0])
            if n != len(names):
                raise EcgfmError(f"--labels: {len(names)} names given, but the classifier has {n} outputs")
            del probe
        loaded = convert_fairseq(checkpoint, output, allow_pickle=unsafe_pickle, labels=names)
    except FileExistsError as e:
        raise EcgfmError(str(e)) from e
    cfg = loaded.encoder_config
    what = f"{loaded.kind}, {cfg.layers} layers x {cfg.embed_dim}"
    if loaded.kind == "classifier":
        what += f", {loaded.heads.get('n_labels')} outputs" + (" (named)" if loaded.labels else " (unnamed)")
    info(f"convert: {checkpoint} -> {output} ({what})")
