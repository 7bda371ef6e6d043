"""``ecgfm convert``: official (faked) fairseq .pt -> our checkpoint dir; embeddings survive the round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main as ecgfm
from conftest import segment_sample
from hf_reference import fairseq_cfg_model, random_fairseq_state, to_finetuned_layout

from ecgfm_cli.commands.convert import MIMIC_IV_ECG_LABELS, challenge2021_labels, resolve_labels
from ecgfm_cli.model.checkpoint import load_checkpoint
from ecgfm_cli.model.config import preset

TINY = preset("tiny")


def _trainer_dict(cfg_model: dict, state: dict) -> dict:
    return {"args": None, "cfg": {"common": {"seed": 1}, "model": cfg_model}, "model": state, "criterion": None,
            "optimizer_history": [{"num_updates": 1}], "extra_state": {"epoch": 1}}


@pytest.fixture(scope="module")
def files(sample_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("convert")
    segment_sample(sample_data / "challenge2021", root, segments="seg.parquet")
    state = random_fairseq_state(TINY, seed=4)
    torch.save(_trainer_dict(fairseq_cfg_model(TINY), state), root / "pretrained.pt")
    ft = to_finetuned_layout(random_fairseq_state(TINY, seed=4, weight_norm="parametrizations"), n_labels=17)
    torch.save(_trainer_dict({"_name": "ecg_transformer_classifier", "args": {"model": fairseq_cfg_model(TINY)}}, ft),
               root / "finetuned.pt")
    return {"root": root, "seg": root / "seg.parquet", "pt": root / "pretrained.pt", "ft": root / "finetuned.pt"}


def test_round_trip_gives_same_embeddings(files, capsys):
    root = files["root"]
    code, err = ecgfm(capsys, "convert", files["pt"], "-o", root / "ckpt")
    assert code == 0 and "pretraining" in err, err
    cfg = json.loads((root / "ckpt" / "config.json").read_text())
    assert cfg["kind"] == "pretraining" and len(cfg["source"]["sha256"]) == 64
    for model, name in ((files["pt"], "pt"), (root / "ckpt", "dir")):
        assert ecgfm(capsys, "embed", files["seg"], "--model", model, "-o", root / f"{name}.npz")[0] == 0
    a, b = np.load(root / "pt.npz"), np.load(root / "dir.npz")
    assert np.array_equal(a["embedding"], b["embedding"])
    assert json.loads(b["__meta__"].item())["model"]["source"]["format"] == "fairseq-signals"


def test_finetuned_with_mimic_labels(files, capsys):
    out = files["root"] / "ft"
    code, err = ecgfm(capsys, "convert", files["ft"], "-o", out, "--labels", "mimic-iv-ecg")
    assert code == 0, err
    loaded = load_checkpoint(out)
    assert loaded.kind == "classifier" and loaded.labels == list(MIMIC_IV_ECG_LABELS)
    # a classifier embeds with its encoder
    assert ecgfm(capsys, "embed", files["seg"], "--model", out, "-o", files["root"] / "ft.npz")[0] == 0


def test_label_errors(files, capsys):
    root = files["root"]
    code, err = ecgfm(capsys, "convert", files["ft"], "-o", root / "x", "--labels", "challenge2021")
    assert code == 2 and "26 names given, but the classifier has 17 outputs" in err
    code, err = ecgfm(capsys, "convert", files["pt"], "-o", root / "x", "--labels", "a,b")
    assert code == 2 and "not a finetuned classifier" in err
    code, err = ecgfm(capsys, "convert", root / "missing.pt", "-o", root / "x")
    assert code == 2 and "no such file" in err
    (root / "junk.pt").write_bytes(b"\x00garbage")
    code, err = ecgfm(capsys, "convert", root / "junk.pt", "-o", root / "x")
    assert code == 2 and "not a PyTorch checkpoint" in err
    assert not (root / "x").exists()
    assert ecgfm(capsys, "convert", files["pt"], "-o", root / "once")[0] == 0
    code, err = ecgfm(capsys, "convert", root / "once", "-o", root / "twice")
    assert code == 2 and "already an ecgfm checkpoint" in err and not (root / "twice").exists()


def test_resolve_labels(tmp_path):
    assert len(MIMIC_IV_ECG_LABELS) == 17 and MIMIC_IV_ECG_LABELS[6] == "Atrial fibrillation"
    c21 = challenge2021_labels()
    assert len(c21) == 26 and "CRBBB|RBBB" in c21 and c21 == resolve_labels("challenge2021")
    assert resolve_labels("AF, SB") == ["AF", "SB"]
    (tmp_path / "l.txt").write_text("# comment\nAF\nSB\n\n")
    assert resolve_labels(str(tmp_path / "l.txt")) == ["AF", "SB"]
    (tmp_path / "l.csv").write_text("code,label\n1,AF\n2,SB\n")
    assert resolve_labels(str(tmp_path / "l.csv")) == ["AF", "SB"]
