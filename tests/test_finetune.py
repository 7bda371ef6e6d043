"""`ecgfm finetune` on the committed Challenge 2021 sample: learning, outputs, reload, frozen conv, splits,
continuous targets, lead subsets, DDP over gloo, and one-line refusals of bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import invoke
from typer.testing import CliRunner

from ecgfm_cli.cli import app
from ecgfm_cli.contract import Contract
from ecgfm_cli.errors import EcgfmError
from ecgfm_cli.model.checkpoint import build_classifier, load_checkpoint, make_config, save_checkpoint
from ecgfm_cli.model.config import preset
from ecgfm_cli.model.encoder import EcgEncoder
from ecgfm_cli.splits import check_patient_disjoint, patient_keys
from ecgfm_cli.train.data import epoch_batches
from ecgfm_cli.train.finetune import finetune_loss, label_statistics
from ecgfm_cli.train.runs import read_log

runner = CliRunner()
MAP = "code,label\n164889003,AF\n426783006,NSR\n59118001,RBBB\n713427006,RBBB\n"
FAST = ("--batch-size", "8", "--lr", "1e-3", "--patience", "0")


@pytest.fixture(scope="module")
def data(challenge_segments: Path, tmp_path_factory) -> dict[str, Path]:
    """Segments of the 22 Challenge 2021 records (the session's: 46 segments, labels-*.parquet beside them), a
    3-label map, and a tiny random 'pretrained' encoder checkpoint."""
    root = tmp_path_factory.mktemp("finetune")
    (root / "map.csv").write_text(MAP)
    torch.manual_seed(3)
    enc = EcgEncoder(preset("tiny"))
    save_checkpoint(root / "init", enc.state_dict(), make_config("encoder", preset("tiny"), contract=Contract()))
    return {"root": root, "segments": challenge_segments, "records": challenge_segments.parent / "records",
            "map": root / "map.csv", "init": root / "init"}


def _segments(path: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    from ecgfm_cli.io.artifacts import open_artifact
    from ecgfm_cli.io.schema import segment_signals

    t = open_artifact(path, "segments").read_all(["record_id", "segment_index", "signal", "lead_present"])
    return np.array(segment_signals(t)), t.column("record_id").to_pylist(), t.column("segment_index").to_numpy()


def _reproduce(run: Path, segments: Path, lead_scale: np.ndarray | None = None) -> None:
    """The saved checkpoint, reloaded, gives the predictions file's values for every predicted segment."""
    ck = load_checkpoint(run / "checkpoint")
    model = build_classifier(ck).eval()
    x, rid, seg = _segments(segments)
    if lead_scale is not None:
        x = x * lead_scale[None, :, None]
    with torch.no_grad():
        z = model(torch.from_numpy(x)).double().numpy()
    binary = np.array([ck.label_kinds[lab] == "binary" for lab in ck.labels])
    expect = np.where(binary, 1 / (1 + np.exp(-z)), z)
    row = {(r, int(s)): i for i, (r, s) in enumerate(zip(rid, seg, strict=True))}
    t = pq.read_table(run / "predictions.parquet").to_pydict()
    idx = [row[(r, s)] for r, s in zip(t["record_id"], t["segment_index"], strict=True)]
    got = np.column_stack([t[lab] for lab in ck.labels])
    np.testing.assert_allclose(got, expect[idx], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_finetune_from_pretrained(data: dict[str, Path], tmp_path: Path) -> None:
    """3 epochs from a tiny encoder checkpoint with a custom code map on the long labels table: the loss falls,
    every output is written, the checkpoint reloads to the same predictions, the conv stack is untouched and
    the rest of the encoder moved, pos_weight comes from the train records only."""
    run = tmp_path / "run"
    invoke("finetune", data["segments"], "--labels", data["segments"], "--label-map", data["map"],
           "--init", data["init"], "-o", run, "--epochs", "3", *FAST)
    log = read_log(run)
    assert [e["epoch"] for e in log] == [1, 2, 3]
    assert {"train_loss", "valid_loss", "valid_macro_auroc", "valid_macro_auprc", "lr", "seconds"} <= set(log[0])
    assert log[-1]["train_loss"] < log[0]["train_loss"]

    t = pq.read_table(run / "predictions.parquet")
    meta = {k.decode(): v.decode() for k, v in t.schema.metadata.items()}
    assert json.loads(meta["ecgfm.labels"]) == ["AF", "NSR", "RBBB"]
    assert json.loads(meta["ecgfm.label_kinds"]) == {"AF": "binary", "NSR": "binary", "RBBB": "binary"}
    assert meta["ecgfm.kind"] == "predictions" and json.loads(meta["ecgfm.leads"])[-1] == "V6"
    assert json.loads(meta["ecgfm.contract"])["sample_rate"] == 500
    prov = json.loads(meta["ecgfm.provenance"])
    assert prov["seed"] == 0 and {"segments", "labels", "init"} <= set(prov["inputs"])
    d = t.to_pydict()
    assert t.num_rows == 46 and set(d["split"]) == {"train", "valid", "test"}
    assert all(0 <= p <= 1 for p in d["AF"])

    ck = load_checkpoint(run / "checkpoint")
    assert ck.kind == "classifier" and ck.labels == ["AF", "NSR", "RBBB"] and ck.contract == Contract()
    assert ck.encoder_config.feature_grad_mult == 0 and ck.encoder_config.activation_dropout == 0.1
    _reproduce(run, data["segments"])

    init = load_checkpoint(data["init"]).state_dict
    conv = [k for k in init if k.startswith("feature_extractor.")]
    assert conv and all(torch.equal(init[k], ck.state_dict["encoder." + k]) for k in conv)
    assert not torch.equal(init["post_extract_proj.weight"], ck.state_dict["encoder.post_extract_proj.weight"])

    # pos_weight = (1 - p) / p over the TRAIN records (labels from the codes table)
    summary = json.loads((run / "summary.json").read_text())
    labels = pq.read_table(next(data["segments"].glob("labels-*.parquet"))).to_pydict()
    codes = dict(zip(labels["record_id"], labels["codes"], strict=True))
    train_records = {r for r, s in zip(d["record_id"], d["split"], strict=True) if s == "train"}
    p = np.mean(["164889003" in codes[r] for r in train_records])
    assert summary["pos_weight"]["AF"] == pytest.approx((1 - p) / p, rel=1e-5)
    assert summary["split_check"]["patients_in_multiple_splits"] == 0


def test_continuous_target_leads_and_overwrite(data: dict[str, Path], tmp_path: Path, capsys) -> None:
    """A wide CSV with a synthetic 'age' (continuous only: MSE, selection on valid MSE, predictions in years),
    patients owning two records (patient-grouped split, disjoint), --leads I,II zeroing the rest, a record
    missing from the labels (counted), and --overwrite replacing an earlier run directory."""
    rids = sorted({r for r in pq.read_table(data["segments"], columns=["record_id"]).column(0).to_pylist()})
    rng = np.random.default_rng(0)
    lines = ["record_id,patient_id,age"] + [f"{r},p{i // 2},{rng.uniform(30, 80):.1f}" for i, r in
                                              enumerate(rids[1:])]
    (tmp_path / "age.csv").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "old.txt").write_text("an earlier run")
    with pytest.raises(EcgfmError, match="not empty"):
        runner.invoke(app, ["finetune", str(data["segments"]), "-l", str(tmp_path / "age.csv"), "--random-init",
                            "--preset", "tiny", "-o", str(run)], catch_exceptions=False)
    invoke("finetune", data["segments"], "-l", tmp_path / "age.csv", "--random-init", "--preset", "tiny",
           "-o", run, "--epochs", "2", "--leads", "I,II", "--overwrite", "--no-predict-train", *FAST)
    assert not (run / "old.txt").exists() and not list(tmp_path.glob(".run.partial*"))
    log = read_log(run)
    assert log[0]["valid_mse_std"] is not None and log[0]["valid_macro_auprc"] is None
    summary = json.loads((run / "summary.json").read_text())
    # the selection names its log key and the best value is that key's value (an MSE: positive)
    assert summary["selection"] == "valid_mse_std"
    assert summary["best_score"] == log[summary["best_epoch"] - 1]["valid_mse_std"] > 0
    assert summary["counts"]["segments_without_label_row"] > 0
    assert 30 < summary["target_standardization"]["age"]["mean"] < 80

    t = pq.read_table(run / "predictions.parquet")
    meta = {k.decode(): v.decode() for k, v in t.schema.metadata.items()}
    assert json.loads(meta["ecgfm.leads"]) == ["I", "II"]
    assert json.loads(meta["ecgfm.label_kinds"]) == {"age": "continuous"}
    d = t.to_pydict()
    assert set(d["split"]) <= {"valid", "test"} and rids[0] not in d["record_id"]
    assert 0 < np.mean(d["age"]) < 150  # original units, not standardised
    assert not check_patient_disjoint(patient_keys(d["record_id"], d["patient_id"]), d["split"])
    ck = load_checkpoint(run / "checkpoint")
    assert ck.config["source"]["input_leads"] == ["I", "II"]
    _reproduce(run, data["segments"], lead_scale=np.array([1, 1] + [0] * 10, dtype=np.float32))
    # embedding with it on all 12 leads is allowed, with a warning that names the leads it was trained on
    from conftest import run_main

    code, err = run_main(capsys, "embed", data["segments"], "--model", run / "checkpoint", "-o", tmp_path / "e.npz")
    assert code == 0 and "finetuned on leads I,II" in err and "--leads I,II" in err


def test_bad_inputs_refused_before_training(data: dict[str, Path], tmp_path: Path) -> None:
    """Contract mismatch, unknown label, non-segments input, unknown lead, no init: one clear error each, and
    nothing written."""
    other = tmp_path / "init250"
    ck = load_checkpoint(data["init"])
    save_checkpoint(other, ck.state_dict, make_config("encoder", ck.encoder_config, contract=Contract(sample_rate=250)))
    base = ["finetune", str(data["segments"]), "-l", str(data["segments"]), "--label-map", str(data["map"])]
    cases = [
        (["--init", str(other)], "sample_rate"),
        (["--init", str(data["init"]), "--targets", "AF,Foo"], "unknown label.*'Foo'"),
        (["--init", str(data["init"]), "--leads", "I,X9"], "unknown lead"),
        ([], "--init CHECKPOINT"),
    ]
    for extra, pattern in cases:
        with pytest.raises(EcgfmError, match=pattern):
            runner.invoke(app, [*base, *extra, "-o", str(tmp_path / "run")], catch_exceptions=False)
    with pytest.raises(EcgfmError, match="segments"):
        runner.invoke(app, ["finetune", str(data["records"]), "-l", str(data["segments"]), "--label-map",
                            str(data["map"]), "--random-init", "--preset", "tiny", "-o", str(tmp_path / "run")],
                      catch_exceptions=False)
    assert not (tmp_path / "run").exists()

    # through the real entry point: exit status 2 and exactly one line on stderr
    res = subprocess.run([sys.executable, "-m", "ecgfm_cli", *base, "--init", str(other), "-o",
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "sample_rate" in res.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_ddp_two_processes(data: dict[str, Path], tmp_path: Path) -> None:
    """--procs 2 (gloo): completes, writes a loadable checkpoint and predictions for every segment."""
    run = tmp_path / "run"
    invoke("finetune", data["segments"], "-l", data["segments"], "--label-map", "challenge2021", "--targets",
           "AF,NSR,CRBBB|RBBB", "--random-init", "--preset", "tiny", "-o", run, "--epochs", "2", "--procs", "2",
           *FAST)
    assert len(read_log(run)) == 2
    assert pq.read_table(run / "predictions.parquet").num_rows == 46
    _reproduce(run, data["segments"])


# --------------------------------------------------------------------------------------------- pure parts


def test_epoch_batches_cover_train_once_per_epoch() -> None:
    rows = np.arange(100, dtype=np.int64)
    rg_start = np.arange(0, 100, 16)
    pos = np.arange(3, 97)
    for world in (1, 2, 3):
        per_rank = [epoch_batches(rows, rg_start, pos, 8, seed=1, epoch=2, rank=r, world_size=world,
                                  shuffle_buffer=20) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1
        assert len({tuple(len(x) for x in b) for b in per_rank}) == 1
        seen = np.concatenate([np.concatenate(b) for b in per_rank])
        assert len(seen) == len(set(seen.tolist())) == len(pos) // world * world
        assert set(seen.tolist()) <= set(pos.tolist())
    a = epoch_batches(rows, rg_start, pos, 8, seed=1, epoch=2)
    b = epoch_batches(rows, rg_start, pos, 8, seed=1, epoch=2)
    c = epoch_batches(rows, rg_start, pos, 8, seed=1, epoch=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))


def test_loss_matches_torch_reference() -> None:
    g = torch.Generator().manual_seed(0)
    out = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([[1, 0, 0.5], [0, 1, -1.0], [1, 1, 2.0], [0, 0, 0.1], [1, 0, 0.0], [0, 1, 1.5]],
                     dtype=torch.float64)
    pw = torch.tensor([3.0, 0.5, 1.0], dtype=torch.float64)
    binary = torch.tensor([True, True, False])
    s, n = finetune_loss(out, y, binary, pw)
    bce = torch.nn.BCEWithLogitsLoss(pos_weight=pw[:2], reduction="sum")(out[:, :2], y[:, :2])
    mse = ((out[:, 2] - y[:, 2]) ** 2).sum()
    assert int(n) == 18 and float(s) == pytest.approx(float(bce + mse))
    y[0, 0] = float("nan")
    s2, n2 = finetune_loss(out, y, binary, pw)
    assert int(n2) == 17 and float(s2) < float(s)


def test_label_statistics_use_train_only() -> None:
    # records r0..r3 in train (r0 has 3 segments), r4..r5 in valid (all positive: must not matter)
    rid = np.array(["r0", "r0", "r0", "r1", "r2", "r3", "r4", "r5"], dtype=object)
    af = np.array([1, 1, 1, 0, 0, 0, 1, 1], dtype=float)
    age = np.array([50, 50, 50, 60, 70, np.nan, 10, 10], dtype=float)
    Y = np.column_stack([af, age, np.zeros(8)])
    train = np.array([True] * 6 + [False] * 2)
    binary = np.array([True, False, True])
    pw, mean, std, notes, prev = label_statistics(Y, binary, train, rid, "records", ["AF", "age", "never"])
    assert pw[0] == pytest.approx(3.0) and prev[0] == pytest.approx(0.25)
    assert mean[1] == pytest.approx(60.0) and std[1] == pytest.approx(np.std([50, 60, 70]))
    assert pw[2] == 1.0 and any("'never'" in n for n in notes)
    pw_seg, *_ = label_statistics(Y, binary, train, rid, "segments", ["AF", "age", "never"])
    assert pw_seg[0] == pytest.approx(1.0)  # 3 positive of 6 train segments


def test_non_finite_loss_stops_with_one_line(data: dict[str, Path], tmp_path: Path, capsys) -> None:
    """NaN in the segments makes the training loss NaN: one clear line after the epoch, and no checkpoint or
    metrics computed from a lost model."""
    from conftest import run_main
    from test_pretrain import nan_segments

    bad = nan_segments(data["segments"], tmp_path / "nan.parquet")
    code, err = run_main(capsys, "finetune", bad, "--labels", data["segments"], "--label-map", data["map"],
                         "--init", data["init"], "--epochs", "2", "-o", tmp_path / "run", *FAST)
    assert code == 2 and "epoch 1: the training loss is nan (not finite)" in err, err
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_no_validation_metric_is_said_and_recorded(data: dict[str, Path], tmp_path: Path, capsys) -> None:
    """A valid split whose labels hold one class gives no metric to select on: the run says why, keeps the last
    epoch, and the note is in summary.json."""
    from conftest import run_main

    rids = sorted({r for r in pq.read_table(data["segments"], columns=["record_id"]).column(0).to_pylist()})
    split = ["train"] * (len(rids) - 6) + ["valid"] * 3 + ["test"] * 3
    af = [i % 2 if s != "valid" else 0 for i, s in enumerate(split)]
    lines = ["record_id,split,AF"] + [f"{r},{s},{a}" for r, s, a in zip(rids, split, af, strict=True)]
    (tmp_path / "l.csv").write_text("\n".join(lines) + "\n")
    code, err = run_main(capsys, "finetune", data["segments"], "-l", tmp_path / "l.csv", "--init", data["init"],
                         "--epochs", "2", "-o", tmp_path / "run", *FAST)
    assert code == 0 and "no validation metric: no label has both classes in the valid split" in err, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["selection"] == "last epoch (no valid metric)" and summary["best_epoch"] == 2
    assert any(n.startswith("no validation metric") for n in summary["notes"])
