"""``ecgfm embed``: outputs, pooling, lead subsets, determinism, multi-process shards and input errors.

Segments come from the committed Challenge 2021 sample (22 records, 46 windows); models are the tiny preset.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import invoke, segment_sample
from conftest import run_main as ecgfm

from ecgfm_cli.contract import Contract
from ecgfm_cli.embed import EmbedError, LoadedModel, check_input, merge_parquet, plan_ranges, rebatch
from ecgfm_cli.io.artifacts import Output, open_artifact
from ecgfm_cli.io.schema import segment_signals
from ecgfm_cli.model.checkpoint import build_encoder, load_checkpoint, make_config, save_checkpoint
from ecgfm_cli.model.config import EncoderConfig, preset
from ecgfm_cli.model.encoder import EcgEncoder
from ecgfm_cli.model.inference import Dense, attention, inference_copy

TINY = preset("tiny")


@pytest.fixture(scope="module")
def data(sample_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("embed")
    segment_sample(sample_data / "challenge2021", root, segments="seg.parquet")
    invoke("segment", root / "records", "-o", root / "seg250.parquet", "--sample-rate", "250")
    torch.manual_seed(0)
    enc = EcgEncoder(TINY)
    save_checkpoint(root / "ckpt", enc.state_dict(), make_config("encoder", TINY))
    return {"root": root, "seg": root / "seg.parquet", "seg250": root / "seg250.parquet", "ckpt": root / "ckpt"}


def read_parquet(path: Path) -> tuple[pa.Table, np.ndarray]:
    t = pq.read_table(path) if path.is_file() else pa.concat_tables(
        pq.read_table(p) for p in sorted(path.glob("embeddings-*.parquet")))
    n = t.num_rows
    return t, t.column("embedding").combine_chunks().values.to_numpy().reshape(n, -1)


def reference_embeddings(ckpt: Path, signals: np.ndarray) -> np.ndarray:
    """Independent computation: the model module's own ``embed``."""
    enc = build_encoder(load_checkpoint(ckpt)).eval()
    with torch.no_grad():
        return enc.embed(torch.from_numpy(np.array(signals, dtype=np.float32))).numpy()


def test_parquet_and_npz_agree_and_equal_encoder_embed(data, capsys):
    out = data["root"] / "a"
    assert ecgfm(capsys, "embed", data["seg"], "--model", data["ckpt"], "-o", out / "e.parquet",
                 "--batch-size", "7")[0] == 0
    assert ecgfm(capsys, "embed", data["seg"], "--model", data["ckpt"], "-o", out / "e.npz")[0] == 0
    t, X = read_parquet(out / "e.parquet")
    seg = pq.read_table(data["seg"])
    assert X.shape == (seg.num_rows, TINY.embed_dim) and X.dtype == np.float32
    assert t.column("record_id").to_pylist() == seg.column("record_id").to_pylist()
    assert t.column("segment_index").to_pylist() == seg.column("segment_index").to_pylist()
    assert t.schema.field("segment_index").type == pa.int32()
    np.testing.assert_allclose(X, reference_embeddings(data["ckpt"], segment_signals(seg)), atol=2e-5, rtol=1e-4)

    z = np.load(out / "e.npz", allow_pickle=False)
    assert z["embedding"].dtype == np.float32 and z["segment_index"].dtype == np.int32
    np.testing.assert_allclose(z["embedding"], X, atol=2e-5)
    assert list(z["record_id"]) == t.column("record_id").to_pylist()
    assert list(z["patient_id"]) == ["" if p is None else p for p in t.column("patient_id").to_pylist()]
    meta = json.loads(z["__meta__"].item())
    assert {"contract", "model", "provenance", "leads"} <= set(meta)

    kv = {k.decode(): v.decode() for k, v in t.schema.metadata.items()}
    assert kv["ecgfm.kind"] == "embeddings"
    assert Contract.from_json(kv["ecgfm.contract"]) == Contract()
    model = json.loads(kv["ecgfm.model"])
    assert model["kind"] == "encoder" and model["encoder"]["embed_dim"] == 64
    prov = json.loads(kv["ecgfm.provenance"])
    assert prov["inputs"]["segments"]["sha256"] and "embed" in prov["command"]
    assert json.loads(kv["ecgfm.leads"]) == list(Contract().leads)


def test_deterministic(data, capsys):
    out = data["root"] / "det"
    for name in ("1", "2"):
        assert ecgfm(capsys, "embed", data["seg"], "--model", data["ckpt"], "-o", out / f"{name}.npz")[0] == 0
    a, b = np.load(out / "1.npz"), np.load(out / "2.npz")
    assert np.array_equal(a["embedding"], b["embedding"])


def test_pool_record(data, capsys):
    out = data["root"] / "pool"
    assert ecgfm(capsys, "embed", data["seg"], "--model", data["ckpt"], "-o", out / "s.parquet")[0] == 0
    assert ecgfm(capsys, "embed", data["seg"], "--model", data["ckpt"], "-o", out / "r.parquet", "--pool", "record",
                 "--batch-size", "5")[0] == 0
    ts, Xs = read_parquet(out / "s.parquet")
    tr, Xr = read_parquet(out / "r.parquet")
    rids = ts.column("record_id").to_pylist()
    assert tr.column("record_id").to_pylist() == list(dict.fromkeys(rids))
    assert set(tr.column("segment_index").to_pylist()) == {-1}
    for i, rid in enumerate(tr.column("record_id").to_pylist()):
        rows = [j for j, r in enumerate(rids) if r == rid]
        np.testing.assert_allclose(Xr[i], Xs[rows].mean(axis=0), atol=1e-6)


def test_leads_subset_equals_zeroed_copy(data, capsys):
    out = data["root"] / "leads"
    seg = pq.read_table(data["seg"])
    x = np.array(segment_signals(seg))
    x[:, 2:] = 0.0  # keep I and II
    fsl = seg.schema.field("signal").type
    zeroed = seg.set_column(seg.schema.get_field_index("signal"), seg.schema.field("signal"),
                            pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), type=fsl))
    out.mkdir()
    zpath = out / "zeroed-segments.parquet"
    pq.write_table(zeroed, zpath)
    assert ecgfm(capsys, "embed", data["seg"], "--model", data["ckpt"], "-o", out / "sub.parquet",
                 "--leads", "I,II")[0] == 0
    assert ecgfm(capsys, "embed", zpath, "--model", data["ckpt"], "-o", out / "zero.parquet")[0] == 0
    assert ecgfm(capsys, "embed", data["seg"], "--model", data["ckpt"], "-o", out / "all.parquet")[0] == 0
    t, Xsub = read_parquet(out / "sub.parquet")
    _, Xzero = read_parquet(out / "zero.parquet")
    _, Xall = read_parquet(out / "all.parquet")
    np.testing.assert_allclose(Xsub, Xzero, atol=1e-6)
    assert not np.allclose(Xsub, Xall)
    assert json.loads(t.schema.metadata[b"ecgfm.leads"]) == ["I", "II"]
    code, err = ecgfm(capsys, "embed", data["seg"], "--model", data["ckpt"], "-o", out / "x.parquet", "--leads", "Z")
    assert code == 2 and "'Z'" in err


def test_bfloat16_close_to_float32(data, capsys):
    out = data["root"] / "bf16"
    assert ecgfm(capsys, "embed", data["seg"], "--model", data["ckpt"], "-o", out / "a.npz")[0] == 0
    assert ecgfm(capsys, "embed", data["seg"], "--model", data["ckpt"], "-o", out / "b.npz",
                 "--dtype", "bfloat16")[0] == 0
    a, b = np.load(out / "a.npz")["embedding"], np.load(out / "b.npz")["embedding"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99


def test_random_init_baseline(data, capsys):
    out = data["root"] / "rand"
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert ecgfm(capsys, "embed", data["seg"], "--random-init", "--preset", "tiny", "--seed", seed,
                     "-o", out / f"{name}.npz")[0] == 0
    a, b, c = (np.load(out / f"{n}.npz") for n in "abc")
    assert np.array_equal(a["embedding"], b["embedding"]) and not np.allclose(a["embedding"], c["embedding"])
    meta = json.loads(a["__meta__"].item())
    assert meta["model"]["kind"] == "random-init" and meta["model"]["seed"] == 1
    code, err = ecgfm(capsys, "embed", data["seg"], "-o", out / "x.npz")
    assert code == 2 and "--random-init" in err


@pytest.mark.slow
def test_procs_shards_read_back_as_one_artifact(data, capsys):
    """The --gpus code path (one spawned process per device, one shard each) on CPU."""
    out = data["root"] / "procs"
    assert ecgfm(capsys, "embed", data["seg"], "--model", data["ckpt"], "-o", out / "one.parquet")[0] == 0
    assert ecgfm(capsys, "embed", data["seg"], "--model", data["ckpt"], "-o", out / "dir", "--procs", "2")[0] == 0
    assert ecgfm(capsys, "embed", data["seg"], "--model", data["ckpt"], "-o", out / "merged.parquet",
                 "--procs", "2", "--pool", "record")[0] == 0
    assert sorted(p.name for p in (out / "dir").glob("embeddings-*")) == [
        "embeddings-s00000of00002-p00000.parquet", "embeddings-s00001of00002-p00000.parquet"]
    t1, X1 = read_parquet(out / "one.parquet")
    reader = open_artifact(out / "dir", "embeddings")
    t2 = reader.read_all()
    X2 = t2.column("embedding").combine_chunks().values.to_numpy().reshape(t2.num_rows, -1)
    assert t2.column("record_id").to_pylist() == t1.column("record_id").to_pylist()
    np.testing.assert_allclose(X2, X1, atol=1e-5)
    tm, Xm = read_parquet(out / "merged.parquet")
    rids = t1.column("record_id").to_pylist()
    assert tm.column("record_id").to_pylist() == list(dict.fromkeys(rids))  # no record split across shards
    assert tm.schema.metadata[b"ecgfm.kind"] == b"embeddings"


def test_plan_ranges_and_merge(data, tmp_path):
    reader = open_artifact(data["seg"], "segments")
    rids = pq.read_table(data["seg"], columns=["record_id"]).column("record_id").to_pylist()
    n = len(rids)
    for k in (1, 2, 3, 7):
        plain = plan_ranges(reader, k, align_records=False)
        assert plain[0][0] == 0 and plain[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(plain, plain[1:], strict=False))
        aligned = plan_ranges(reader, k, align_records=True)
        assert aligned[-1][1] == n
        for start, _ in aligned[1:]:
            assert start == n or rids[start] != rids[start - 1]
    # merge: shard files concatenated in order, one artifact
    schema = pa.schema([("record_id", pa.string()), ("patient_id", pa.string()), ("segment_index", pa.int32()),
                        ("embedding", pa.list_(pa.field("item", pa.float32(), nullable=False), 2))])
    parts = []
    for i in range(3):
        t = pa.table({"record_id": [f"r{i}a", f"r{i}b"], "patient_id": [None, "p"], "segment_index": pa.array(
            [0, 1], pa.int32()), "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(np.arange(4, dtype=np.float32) + i), 2)}, schema=schema)
        parts.append(tmp_path / f"embeddings-s{i:05d}of00003-p00000.parquet")
        pq.write_table(t, parts[-1])
    merge_parquet(parts, Output("parquet", tmp_path / "m.parquet"), schema)
    m = pq.read_table(tmp_path / "m.parquet")
    assert m.column("record_id").to_pylist() == ["r0a", "r0b", "r1a", "r1b", "r2a", "r2b"]
    assert m.schema.metadata[b"ecgfm.kind"] == b"embeddings"
    assert [b.num_rows for b in rebatch(iter(pa.Table.from_batches(
        [pa.record_batch({"a": list(range(5))})] * 3).to_batches()), 4)] == [4, 4, 4, 3]


def test_prepared_encoder_general_conv_matches_module():
    """The prepared encoder keeps kernel != stride convolutions as they are, and handles odd positional kernels."""
    cfg = EncoderConfig(conv_layers=((16, 3, 2), (16, 2, 2)), embed_dim=32, layers=1, heads=2, ffn_dim=64,
                        conv_pos=7, conv_pos_groups=2).with_dropouts(0.0)
    torch.manual_seed(0)
    enc = EcgEncoder(cfg).eval()
    x = torch.randn(3, 12, 500)
    with torch.no_grad():
        torch.testing.assert_close(inference_copy(enc).embed(x), enc.embed(x), atol=1e-5, rtol=1e-4)


def test_cpu_attention_equals_sdpa():
    """The per-sample CPU attention (float32 softmax, heads written in place) is softmax(q k^T) v with q
    pre-scaled, as ``scaled_dot_product_attention(scale=1)`` computes it on the (B, H, T, d) views."""
    torch.manual_seed(0)
    qkv = torch.randn(3, 10, 3, 4, 8)  # (B, T, 3, H, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0).transpose(1, 2).reshape(3, 10, 32)
    torch.testing.assert_close(attention(qkv), want, atol=1e-5, rtol=1e-5)
    got16 = attention(qkv.bfloat16())
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.float(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gelu", [False, True])
def test_dense_equals_linear_and_repacks_when_the_weight_changes(dtype, gelu):
    """``Dense`` (oneDNN with a pre-packed weight on CPU) computes ``F.linear`` (+ exact GELU), also for row
    counts other than the one it packed for, and never serves a stale packed weight."""
    import copy

    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 40)
    layer = Dense.copy(lin, dtype, gelu=gelu)

    def expected(x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x.to(dtype).float(), lin.weight.to(dtype).float(), lin.bias.to(dtype).float())
        return torch.nn.functional.gelu(y) if gelu else y

    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    for rows in (1, 7, 2496):
        x = torch.randn(rows, 24)
        torch.testing.assert_close(layer(x).float(), expected(x), **tol)
    with torch.no_grad():
        lin.weight.mul_(-2.0)
        layer.load_state_dict({"weight": lin.weight.to(dtype), "bias": lin.bias.to(dtype)})  # in place
    x = torch.randn(5, 3, 24)
    torch.testing.assert_close(layer(x).float(), expected(x), **tol)
    torch.testing.assert_close(copy.deepcopy(layer)(x), layer(x))  # the opaque packed copy is not copied


def test_dense_without_onednn_packing(monkeypatch):
    """A torch build that cannot pack weights for oneDNN still computes ``F.linear`` (+ GELU) with the plain one."""
    def no_packing(*args):
        raise RuntimeError("not in this build")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", no_packing)
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 40)
    x = torch.randn(7, 24)
    want = torch.nn.functional.gelu(lin(x))
    torch.testing.assert_close(Dense.copy(lin, torch.float32, gelu=True)(x), want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ bad input


def test_contract_mismatch_names_the_field(data, capsys):
    code, err = ecgfm(capsys, "embed", data["seg250"], "--model", data["ckpt"], "-o", data["root"] / "x.npz")
    assert code == 2 and "sample_rate: segments have 250, model expects 500" in err
    assert len(err.strip().splitlines()) == 1


def test_wrong_length_or_leads(data, capsys, tmp_path):
    invoke("segment", data["root"] / "records", "-o", tmp_path / "s4.parquet", "--seconds", "4")
    code, err = ecgfm(capsys, "embed", tmp_path / "s4.parquet", "--model", data["ckpt"], "-o", tmp_path / "x.npz")
    assert code == 2 and "window: segments have 2000, model expects 2500" in err
    # without contract metadata, the shape check alone refuses
    reader = open_artifact(tmp_path / "s4.parquet", "segments")
    model = LoadedModel(EcgEncoder(TINY), Contract(), {})
    with pytest.raises(EmbedError, match="12 leads x 2000 samples, the model takes 12 leads x 2500"):
        check_input(reader.schema, {}, model)
    model8 = LoadedModel(EcgEncoder(preset("tiny", in_channels=8)), Contract(), {})
    with pytest.raises(EmbedError, match="12 leads x 2500 samples, the model takes 8 leads"):
        check_input(open_artifact(data["seg"], "segments").schema, {}, model8)


def _with_nan(seg_path: Path, out: Path, rows: list[int]) -> None:
    seg = pq.read_table(seg_path)
    x = np.array(segment_signals(seg))
    x[rows, 3, 100] = np.nan
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), type=seg.schema.field("signal").type)
    pq.write_table(seg.set_column(seg.schema.get_field_index("signal"), seg.schema.field("signal"), col), out)


def test_nan_refused_or_skipped(data, capsys, tmp_path):
    _with_nan(data["seg"], tmp_path / "nan.parquet", [3, 10])
    rids = pq.read_table(data["seg"]).column("record_id").to_pylist()
    code, err = ecgfm(capsys, "embed", tmp_path / "nan.parquet", "--model", data["ckpt"], "-o", tmp_path / "x.parquet")
    assert code == 2 and rids[3] in err and "--nan skip" in err
    assert not list(tmp_path.glob("*x.parquet*"))  # nothing half-written
    code, err = ecgfm(capsys, "embed", tmp_path / "nan.parquet", "--model", data["ckpt"], "-o",
                      tmp_path / "y.parquet", "--nan", "skip", "--batch-size", "4")
    assert code == 0 and "2 segment(s) with NaN/Inf skipped" in err
    t, X = read_parquet(tmp_path / "y.parquet")
    assert t.num_rows == len(rids) - 2 and np.isfinite(X).all()


def test_missing_or_bad_model(data, capsys, tmp_path):
    code, err = ecgfm(capsys, "embed", data["seg"], "--model", tmp_path / "nope.pt", "-o", tmp_path / "x.npz")
    assert code == 2 and "no such file" in err
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    code, err = ecgfm(capsys, "embed", data["seg"], "--model", tmp_path / "junk.pt", "-o", tmp_path / "x.npz")
    assert code == 2 and "not a PyTorch checkpoint" in err


def test_empty_input(data, capsys, tmp_path):
    seg = pq.read_table(data["seg"])
    pq.write_table(seg.slice(0, 0), tmp_path / "empty.parquet")
    code, err = ecgfm(capsys, "embed", tmp_path / "empty.parquet", "--model", data["ckpt"], "-o", tmp_path / "x.npz")
    assert code == 2 and "no segments" in err


def test_output_directory_of_another_artifact_is_refused(data, capsys, tmp_path):
    """Embeddings written into a segments directory would clear its done-marker and mix two artifacts."""
    segs = tmp_path / "segs"
    invoke("segment", data["root"] / "records", "-o", segs)
    before = sorted(p.name for p in segs.iterdir())
    code, err = ecgfm(capsys, "embed", segs, "--model", data["ckpt"], "-o", segs)
    assert code == 2 and "already holds segments" in err
    assert sorted(p.name for p in segs.iterdir()) == before
    # a checkpoint or run directory given as -o (a slip for --model) is refused, not written into
    code, err = ecgfm(capsys, "embed", segs, "--model", data["ckpt"], "-o", data["ckpt"])
    assert code == 2 and "holds other files (config.json, model.safetensors)" in err


def test_bad_output_refused_before_model_load(data, capsys, tmp_path):
    # the model path does not exist either: the output is checked first
    code, err = ecgfm(capsys, "embed", data["seg"], "--model", tmp_path / "nope", "-o", tmp_path / "x.csv")
    assert code == 2 and "x.csv" in err and "no such file" not in err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, err = ecgfm(capsys, "embed", data["seg"], "--model", data["ckpt"], "-o", ro / "x.npz")
        import os

        assert os.geteuid() == 0 or (code == 2 and "not writable" in err)
    finally:
        ro.chmod(0o700)
