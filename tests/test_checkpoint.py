"""Checkpoints: official fairseq layouts (written here with random weights), strictness, safe loading,
and the project's own directory format."""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_reference import (
    build_hf_model,
    fairseq_cfg_model,
    fairseq_to_hf_state,
    random_fairseq_state,
    to_finetuned_layout,
)

from ecgfm_cli.contract import Contract
from ecgfm_cli.model.checkpoint import (
    CheckpointError,
    build_classifier,
    build_encoder,
    convert_fairseq,
    load_checkpoint,
    make_config,
    save_checkpoint,
    state_dict_from_fairseq,
)
from ecgfm_cli.model.config import preset

TINY = preset("tiny")
X = torch.randn(2, 12, 2500, generator=torch.Generator().manual_seed(5))


class NotAllowed:
    """A custom class: unpickling it would run code, so the loader must refuse it by default."""


def _trainer_dict(cfg_model: dict | None, state: dict, **extra) -> dict:
    """What fairseq's trainer saves (minus the optimizer state)."""
    out = {"args": None, "model": state, "criterion": None,
           "optimizer_history": [{"criterion_name": "Wav2Vec2WithCMSCCriterion", "num_updates": 10}],
           "extra_state": {"epoch": 3, "val_loss": 1.5}, **extra}
    if cfg_model is not None:
        out["cfg"] = {"common": {"seed": 1}, "task": {"_name": "ecg_pretraining"}, "model": cfg_model}
    return out


@pytest.fixture(scope="module")
def pretrained_state() -> dict:
    return random_fairseq_state(TINY, seed=3)


@pytest.fixture
def pretrained_pt(tmp_path, pretrained_state) -> Path:
    p = tmp_path / "mimic_iv_ecg_physionet_pretrained.pt"
    torch.save(_trainer_dict(fairseq_cfg_model(TINY), pretrained_state), p)
    return p


@pytest.fixture
def finetuned_pt(tmp_path, pretrained_state) -> Path:
    """Finetuned layout, parametrizations naming, encoder cfg nested (classifier cfg has finetune dropouts)."""
    state = to_finetuned_layout(random_fairseq_state(TINY, seed=3, weight_norm="parametrizations"), n_labels=4)
    cfg = {"_name": "ecg_transformer_classifier", "num_labels": 4, "dropout": 0.0, "activation_dropout": 0.1,
           "feature_grad_mult": 0.0, "args": {"model": fairseq_cfg_model(TINY)}}
    p = tmp_path / "mimic_iv_ecg_finetuned.pt"
    torch.save(_trainer_dict(cfg, state), p)
    return p


def _hf_output(state: dict) -> torch.Tensor:
    hf = build_hf_model(TINY)
    hf.load_state_dict(fairseq_to_hf_state(
        {k: v for k, v in state.items() if not k.startswith(("mask_emb", "quantizer.", "project_q.", "final_"))}
    ))
    with torch.no_grad():
        return hf(X).last_hidden_state


def test_pretrained_file_loads_and_matches_transformers(pretrained_pt, pretrained_state):
    loaded = load_checkpoint(pretrained_pt)
    assert loaded.kind == "pretraining" and loaded.encoder_config == TINY
    assert loaded.contract == Contract() and loaded.labels is None
    assert loaded.heads == {"latent_groups": 2, "latent_vars": 320, "latent_dim": 256, "final_dim": 256}
    assert "mask_emb" in loaded.state_dict and "encoder.layer_norm.weight" in loaded.state_dict
    enc = build_encoder(loaded).eval()
    with torch.no_grad():
        out = enc(X)
    assert (out - _hf_output(pretrained_state)).abs().max() <= 1e-4
    with pytest.raises(CheckpointError, match="n_labels"):
        build_classifier(loaded)
    assert build_classifier(loaded, n_labels=3)(X).shape == (2, 3)


def test_finetuned_file_loads_as_classifier(finetuned_pt, pretrained_state):
    loaded = load_checkpoint(finetuned_pt)
    assert loaded.kind == "classifier" and loaded.heads["n_labels"] == 4
    cfg = loaded.encoder_config
    assert (cfg.heads, cfg.layers, cfg.dropout, cfg.activation_dropout, cfg.feature_grad_mult) == (4, 2, 0, 0.1, 0)
    clf = build_classifier(loaded).eval()
    with torch.no_grad():
        logits = clf(X)
    ref = _hf_output(pretrained_state).mean(1) @ loaded.state_dict["proj.weight"].T + loaded.state_dict["proj.bias"]
    assert (logits - ref).abs().max() <= 1e-4
    assert set(build_encoder(loaded).state_dict()) == {k[8:] for k in loaded.state_dict if k.startswith("encoder.")}


def test_missing_cfg_stale_cfg_and_namespace_args(tmp_path, pretrained_state):
    p = tmp_path / "nocfg.pt"
    torch.save({"model": pretrained_state}, p)
    assert load_checkpoint(p).encoder_config.embed_dim == 64  # architecture from shapes alone

    stale = fairseq_cfg_model(preset("large"), encoder_attention_heads=4)
    torch.save(_trainer_dict(stale, pretrained_state), p)
    assert load_checkpoint(p).encoder_config.layers == 2

    # old fairseq files carry an argparse.Namespace: harmless globals, loaded without allow_pickle
    ns = argparse.Namespace(**fairseq_cfg_model(TINY))
    extra = {"val_loss": np.float64(1.5), "best": np.arange(3)}  # numpy scalars/arrays are allowlisted too
    torch.save({"args": ns, "model": pretrained_state, "extra_state": extra}, p)
    assert load_checkpoint(p).encoder_config == TINY


def test_strict_key_and_shape_errors(tmp_path, pretrained_state):
    p = tmp_path / "bad.pt"
    state = dict(pretrained_state)
    del state["encoder.layers.1.fc2.bias"]
    state["post_extract_proj.weight"] = torch.zeros(64, 33)
    state["encoder.layers.0.extra.weight"] = torch.zeros(3)
    torch.save(_trainer_dict(fairseq_cfg_model(TINY), state), p)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(p)
    msg = str(err.value)
    assert "missing keys (1): encoder.encoder.layers.1.fc2.bias" in msg
    assert "unexpected keys (1): encoder.encoder.layers.0.extra.weight" in msg
    assert "(64, 33)" in msg and "(64, 32)" in msg


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("content", ["text", "list", "dict", "bytes", "state_only_garbage"])
def test_not_a_checkpoint(tmp_path, content):
    p = tmp_path / "x.pt"
    if content == "text":
        p.write_text("hello, I am a README\n")
    elif content == "list":
        torch.save([1, 2, 3], p)
    elif content == "dict":
        torch.save({"weights": torch.zeros(3)}, p)
    elif content == "bytes":
        p.write_bytes(pickle.dumps([1, 2]))
    else:
        torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, p)
    with pytest.raises(CheckpointError):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(tmp_path)


def test_custom_class_is_refused_unless_allowed(tmp_path, pretrained_state):
    p = tmp_path / "custom.pt"
    torch.save(_trainer_dict(fairseq_cfg_model(TINY), pretrained_state, extra=NotAllowed()), p)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle .*NotAllowed.*allow_pickle=True"):
        load_checkpoint(p)
    assert load_checkpoint(p, allow_pickle=True).kind == "pretraining"


def test_state_dict_from_fairseq_normalises_namings(pretrained_state):
    kind, state = state_dict_from_fairseq(pretrained_state)
    assert kind == "pretraining"
    assert "encoder.conv_pos.pos_conv.0.parametrizations.weight.original1" in state
    assert not any("weight_g" in k or "weight_v" in k for k in state)
    enc_only = {k: v for k, v in pretrained_state.items()
                if not k.startswith(("mask_emb", "quantizer.", "project_q.", "final_proj."))}
    assert state_dict_from_fairseq(enc_only)[0] == "encoder"
    assert state_dict_from_fairseq({"module." + k: v for k, v in enc_only.items()})[0] == "encoder"
    with pytest.raises(CheckpointError, match="not an ECG-FM"):
        state_dict_from_fairseq({"fc.weight": torch.zeros(1)})


def test_own_format_round_trip(tmp_path, pretrained_pt, finetuned_pt):
    out = tmp_path / "ckpt"
    conv = convert_fairseq(pretrained_pt, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "ecgfm" and cfg["format_version"] == 1 and cfg["kind"] == "pretraining"
    assert set(cfg) == {"format", "format_version", "kind", "encoder", "heads", "contract", "labels",
                        "label_kinds", "source"}
    assert cfg["contract"]["leads"][:3] == ["I", "II", "III"] and len(cfg["source"]["sha256"]) == 64
    src = build_encoder(load_checkpoint(pretrained_pt)).eval()
    for path in (out, out / "config.json", out / "model.safetensors"):
        again = build_encoder(load_checkpoint(path)).eval()
        with torch.no_grad():
            assert torch.equal(again(X), src(X))
    assert conv.kind == "pretraining"

    # overwrite an existing checkpoint with a classifier (labels + kinds); no temp dirs left behind
    ft = load_checkpoint(finetuned_pt)
    config = make_config("classifier", ft.encoder_config, heads=ft.heads, labels=["a", "b", "c", "d"],
                         label_kinds={"a": "binary", "b": "binary", "c": "binary", "d": "continuous"})
    save_checkpoint(out, build_classifier(ft).state_dict(), config)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    back = load_checkpoint(out)
    assert back.kind == "classifier" and back.labels == ["a", "b", "c", "d"]
    assert back.label_kinds["d"] == "continuous"
    with torch.no_grad():
        assert torch.equal(build_classifier(back).eval()(X), build_classifier(ft).eval()(X))

    # a bare encoder state with a folded plain pos-conv weight is accepted and re-split into g, v
    enc = build_encoder(ft).eval()
    plain = {k: v for k, v in enc.state_dict().items() if "parametrizations" not in k}
    plain["conv_pos.pos_conv.0.weight"] = enc.conv_pos.pos_conv[0].weight.detach()
    save_checkpoint(tmp_path / "enc", plain, make_config("encoder", ft.encoder_config))
    with torch.no_grad():
        torch.testing.assert_close(build_encoder(load_checkpoint(tmp_path / "enc")).eval()(X), enc(X))


def test_own_format_refusals(tmp_path, pretrained_pt):
    loaded = load_checkpoint(pretrained_pt)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        save_checkpoint(other, loaded.state_dict, loaded.config)
    assert (other / "todo.txt").read_text() == "mine"

    bad = dict(loaded.state_dict)
    bad["encoder.encoder.layer_norm.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"encoder.encoder.layer_norm.weight: checkpoint \(3,\)"):
        save_checkpoint(tmp_path / "bad", bad, loaded.config)
    assert not (tmp_path / "bad").exists()

    out = save_checkpoint(tmp_path / "ok", loaded.state_dict, loaded.config)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(out)
    (out / "config.json").write_text(json.dumps({**cfg, "kind": "detector"}))
    with pytest.raises(CheckpointError, match="kind"):
        load_checkpoint(out)
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(out)
