"""`ecgfm pretrain` end to end: exact resume, learning on real records, checkpoints, bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import invoke
from typer.testing import CliRunner

from ecgfm_cli.cli import app
from ecgfm_cli.errors import EcgfmError
from ecgfm_cli.train.pretrain import lr_at
from ecgfm_cli.train.runs import read_log

runner = CliRunner()

# The tiny model with a small objective keeps a CPU update well under a second.
TINY = ("--preset", "tiny", "--batch-size", "8", "--log-every", "1", "--num-negatives", "20")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def segments(sample_segments: Path) -> Path:
    return sample_segments


def losses(run: Path) -> list[float]:
    return [e["loss"] for e in read_log(run)]


@pytest.mark.slow
def test_resume_continues_exactly(segments: Path, tmp_path: Path) -> None:
    """Kill at update 3 (simulated: stop there with a checkpoint), resume to 6: the per-update losses equal an
    uninterrupted 6-update run. Accumulation over 2 batches, 2 loader workers, an epoch boundary crossed
    after the resume."""
    common = (*TINY, "--update-freq", "2", "--workers", "2")
    seeded = ("--seed", "7", "--shuffle-buffer", "8")
    full, cut = tmp_path / "full", tmp_path / "cut"
    invoke("pretrain", segments, "-o", full, *common, *seeded, "--max-updates", "6", "--save-every", "3")
    # the interrupted run loads with DataLoader processes, the others with threads: same batches
    invoke("pretrain", segments, "-o", cut, *common, *seeded, "--max-updates", "3", "--save-every", "3",
           "--worker-processes")
    assert (cut / "latest").read_text().strip() == "checkpoint-3"
    # killed while appending a log line; resumed without repeating --seed / --shuffle-buffer and with another
    # objective option: the run's data order and objective are kept
    with open(cut / "log.jsonl", "a") as f:
        f.write('{"update": 4, "lo')
    res = runner.invoke(app, [str(a) for a in ("pretrain", segments, "-o", cut, *common, "--max-updates", "6",
                                               "--save-every", "3", "--resume", "--cmsc-weight", "3", "--lr", "1e-3")],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "given but not used: cmsc_weight=3.0 (run: 1.0), lr=0.001 (run: 5e-05)" in res.output
    assert "seed=" not in res.output  # not given: no "given but not used" for the run's --seed 7
    assert "lr=0.001 (run: 5e-05)" in res.output
    a, b = read_log(full), read_log(cut)
    assert [e["update"] for e in a] == [e["update"] for e in b] == [1, 2, 3, 4, 5, 6]
    assert max(e["epoch"] for e in a) > 1.0  # the data stream wrapped into a new epoch
    for key in ("loss", "contrastive", "cmsc", "code_perplexity", "grad_norm"):
        np.testing.assert_allclose([e[key] for e in b], [e[key] for e in a], rtol=1e-5, atol=1e-7, err_msg=key)
    assert a[-1]["temperature"] == b[-1]["temperature"] < 2.0
    assert [e["lr"] for e in b] == [e["lr"] for e in a]
    no_batch = [a for a in common if a not in ("--batch-size", "8")]
    done = runner.invoke(app, [str(a) for a in ("pretrain", segments, "-o", cut, *no_batch, "--resume")])
    # no limit and no batch size given: the run's own (--max-updates 6, batch 8), and it has reached the limit
    assert done.exit_code != 0 and "already at --max-updates 6" in str(done.exception)

    # the checkpoints are in the project's format and hold the complete trainer state
    import torch

    from ecgfm_cli.model.checkpoint import load_checkpoint

    ck = load_checkpoint(full / "checkpoint-6")
    assert ck.kind == "pretraining" and ck.encoder_config.embed_dim == 64
    state = torch.load(full / "checkpoint-6" / "trainer_state.pt", weights_only=True)
    assert state["update"] == 6 and state["num_updates"] == 6 and len(state["rng"]) == 1
    assert {"epoch", "batch", "seed"} <= set(state["data"])
    assert json.loads((full / "summary.json").read_text())["updates"] == 6


@pytest.mark.slow
def test_learns_on_real_records(segments: Path, tmp_path: Path) -> None:
    """Tiny model, real ECGs (the committed sample), 80 CPU updates: the loss falls and the codebook is used."""
    run = tmp_path / "run"
    invoke("pretrain", segments, "-o", run, *TINY, "--max-updates", "80", "--lr", "1e-3",
           "--save-every", "40", "--keep-last", "1", "--workers", "1")
    log = read_log(run)
    assert len(log) == 80
    first, last = np.mean([e["loss"] for e in log[:10]]), np.mean([e["loss"] for e in log[-10:]])
    assert last < first - 0.1, (first, last)
    assert min(e["code_perplexity"] for e in log[-10:]) > 4.0  # no codebook collapse
    # metrics are read one update late; the rates must still be per update (no near-zero final interval)
    rates = [e["segments_per_s"] for e in log[1:]]
    assert max(rates) < 10 * float(np.median(rates)), rates
    for key in ("update", "epoch", "loss", "contrastive", "diversity", "features_pen", "cmsc", "prob_perplexity",
                "code_perplexity", "temperature", "lr", "segments_per_s", "max_memory_mb", "grad_norm"):
        assert key in log[-1]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-80"]  # --keep-last 1
    assert (run / "latest").read_text().strip() == "checkpoint-80"
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["data"]["pairs"] > 0 and run_json["world_size"] == 1


def test_max_time_stops_within_one_update(segments: Path, tmp_path: Path) -> None:
    """The ranks' stop vote is read with the metrics, one update late (the host never waits on the update it
    just queued): --max-time 0 ends after two updates, logged, checkpointed, and says why."""
    run = tmp_path / "run"
    invoke("pretrain", segments, "-o", run, *TINY, "--max-updates", "50", "--max-time", "0", "--workers", "1")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "max-time" and summary["updates"] == 2
    assert [e["update"] for e in read_log(run)] == [1, 2] and read_log(run)[-1]["stop"]
    assert (run / "latest").read_text().strip() == "checkpoint-2"


def test_log_reaches_every_checkpoint(segments: Path, tmp_path: Path, monkeypatch) -> None:
    """Metrics are read one update late, but a checkpoint is written only after its own update is logged: a run
    killed right after saving checkpoint-2 has log lines 1 and 2, so the resumed run's log has no gap."""
    import ecgfm_cli.train.pretrain as pretrain

    real = pretrain.save_run_checkpoint

    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt("killed after the checkpoint")

    monkeypatch.setattr(pretrain, "save_run_checkpoint", save_then_die)
    run = tmp_path / "run"
    res = runner.invoke(app, [str(a) for a in ("pretrain", segments, "-o", run, *TINY, "--max-updates", "5",
                                                 "--save-every", "2", "--workers", "1")])
    assert res.exit_code != 0
    assert (run / "latest").read_text().strip() == "checkpoint-2"
    assert [e["update"] for e in read_log(run)] == [1, 2]


def test_init_from_our_checkpoint_and_ablations(segments: Path, tmp_path: Path) -> None:
    first = tmp_path / "a"
    invoke("pretrain", segments, "-o", first, *TINY, "--max-updates", "1", "--workers", "1", "--no-cmsc")
    second = tmp_path / "b"
    invoke("pretrain", segments, "-o", second, "--batch-size", "8", "--init", first / "checkpoint-1",
           "--max-updates", "1", "--workers", "1", "--no-w2v", "--no-rlm")
    entry = read_log(second)[-1]
    assert entry["contrastive"] == 0.0 and entry["cmsc"] > 0
    assert json.loads((second / "run.json").read_text())["encoder"]["embed_dim"] == 64  # from --init

    # a classifier carries finetuning dropouts: continued pretraining from it uses the pretraining ones
    from dataclasses import replace

    from ecgfm_cli.model.checkpoint import make_config, save_checkpoint
    from ecgfm_cli.model.config import preset
    from ecgfm_cli.model.encoder import EcgClassifier
    from ecgfm_cli.train.finetune import FINETUNE_DROPOUTS

    cfg = replace(preset("tiny"), **FINETUNE_DROPOUTS, feature_grad_mult=0.0)
    save_checkpoint(tmp_path / "clf", EcgClassifier(cfg, 2).state_dict(),
                    make_config("classifier", cfg, heads={"n_labels": 2}, labels=["a", "b"]))
    third = tmp_path / "c"
    invoke("pretrain", segments, "-o", third, "--batch-size", "8", "--init", tmp_path / "clf", "--max-updates", "1",
           "--workers", "1")
    enc = json.loads((third / "run.json").read_text())["encoder"]
    assert (enc["dropout"], enc["attention_dropout"], enc["activation_dropout"], enc["dropout_input"]) == (
        0.1, 0.1, 0.0, 0.1)


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="torch.compile on CPU needs a C compiler")
def test_compile_trains_and_saves_the_same_layout(segments: Path, tmp_path: Path) -> None:
    """--compile: compiled layers train (finite loss) and the checkpoint has the plain fairseq keys."""
    from ecgfm_cli.model.checkpoint import load_checkpoint

    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    invoke("pretrain", segments, "-o", eager, *TINY, "--max-updates", "1", "--workers", "1")
    from torch._dynamo.utils import counters

    counters.clear()
    invoke("pretrain", segments, "-o", compiled, *TINY, "--max-updates", "2", "--workers", "1", "--compile")
    assert counters["stats"]["unique_graphs"] >= 1  # the layers did go through torch.compile
    assert np.isfinite(losses(compiled)).all()
    assert set(load_checkpoint(compiled / "checkpoint-2").state_dict) == set(
        load_checkpoint(eager / "checkpoint-1").state_dict)


def nan_segments(segments: Path, out: Path) -> Path:
    """A copy of ``segments`` as one Parquet file in which every segment holds a NaN (``ecgfm segment`` never
    writes one; a hand-made file can)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ecgfm_cli.io.artifacts import open_artifact

    table = open_artifact(segments, "segments").read_all()
    signal = table.column("signal").combine_chunks()
    values = signal.values.to_numpy(zero_copy_only=False).copy()
    values[:: signal.type.list_size] = np.nan
    col = pa.FixedSizeListArray.from_arrays(pa.array(values), type=signal.type)
    pq.write_table(table.set_column(table.schema.get_field_index("signal"), table.schema.field("signal"), col), out)
    return out


def test_non_finite_loss_stops_with_one_line(segments: Path, tmp_path: Path, capsys) -> None:
    """NaN in the input makes the loss NaN: the run stops with one clear line at that update, writes no NaN
    checkpoint, and the same holds over two processes."""
    from conftest import run_main

    bad = nan_segments(segments, tmp_path / "nan.parquet")
    code, err = run_main(capsys, "pretrain", bad, "-o", tmp_path / "run", *TINY, "--max-updates", "3",
                         "--workers", "1", "--save-every", "1")
    assert code == 2 and "update 1: the loss is nan (not finite)" in err and "no checkpoint was written" in err
    assert not list((tmp_path / "run").glob("checkpoint-*"))
    code, err = run_main(capsys, "pretrain", bad, "-o", tmp_path / "run2", *TINY, "--max-updates", "2",
                         "--workers", "1", "--procs", "2")
    assert code == 2 and "the loss is nan (not finite)" in err and "Traceback" not in err


def test_bad_input_fails_before_training(segments: Path, tmp_path: Path, sample_data: Path) -> None:
    def fails(*args, match: str) -> None:
        with pytest.raises(EcgfmError, match=match):
            runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    empty = tmp_path / "empty"
    empty.mkdir()
    fails("pretrain", empty, "-o", tmp_path / "r1", *TINY, match="no segments files")
    records = segments.parent / "records"
    fails("pretrain", records, "-o", tmp_path / "r2", *TINY, match="no segments files.*records")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        fails("pretrain", segments, "-o", ro / "run", *TINY, match="not a writable directory")
    afile = tmp_path / "file"
    afile.write_text("x")
    fails("pretrain", segments, "-o", afile / "run", *TINY, match="not a writable directory")
    fails("pretrain", segments, "-o", tmp_path / "r3", *TINY, "--batch-size", "200", match="not enough data")
    fails("pretrain", segments, "-o", tmp_path / "r3", *TINY, "--batch-size", "7", match="must be even with CMSC")
    fails("pretrain", segments, "-o", tmp_path / "r3", *TINY, "--final-dim", "7", match="divisible by --latent-groups")
    if Path("/proc/self").is_dir():  # writable for os.access as root, yet nothing can be created there
        fails("pretrain", segments, "-o", "/proc/ecgfm-run", *TINY, match="/proc is not a writable directory")
    fails("pretrain", segments, "-o", tmp_path / "r4", *TINY, "--resume", match="no complete checkpoint")
    fails("pretrain", segments, "-o", tmp_path / "r5", *TINY, "--init", tmp_path / "missing",
          match="no such file")
    # a checkpoint made for another contract
    from ecgfm_cli.contract import Contract
    from ecgfm_cli.model.checkpoint import make_config, save_checkpoint
    from ecgfm_cli.model.config import preset
    from ecgfm_cli.model.encoder import EcgEncoder

    cfg = preset("tiny")
    ck = save_checkpoint(tmp_path / "ck250", EcgEncoder(cfg).state_dict(),
                         make_config("encoder", cfg, contract=Contract(sample_rate=250, window=1250)))
    fails("pretrain", segments, "-o", tmp_path / "r6", *TINY, "--init", ck,
          match="than the checkpoint .*sample_rate: segments have 500")
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 7))
    # an existing run is not overwritten without --resume
    run = tmp_path / "done"
    invoke("pretrain", segments, "-o", run, *TINY, "--max-updates", "1", "--workers", "1")
    fails("pretrain", segments, "-o", run, *TINY, match="already holds a pretraining run")


def test_lr_schedule() -> None:
    from ecgfm_cli.train.pretrain import TrainOptions

    fixed = TrainOptions("s", "o")
    assert lr_at(0, fixed) == lr_at(10**6, fixed) == 5e-5
    warm = TrainOptions("s", "o", lr=1.0, lr_schedule="cosine", warmup_updates=10, max_updates=110)
    assert lr_at(0, warm) == pytest.approx(0.1) and lr_at(9, warm) == pytest.approx(1.0)
    assert lr_at(60, warm) == pytest.approx(0.5) and lr_at(110, warm) == pytest.approx(0.0, abs=1e-12)


def test_gpu_benchmark_flop_counter_and_no_cuda_message() -> None:
    """benchmarks/gpu_pretrain_mfu.py: its analytic FLOP count matches the model's matmul weights, and without
    CUDA it says so instead of failing obscurely."""
    import subprocess
    import sys

    import torch
    from torch import nn

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from gpu_pretrain_mfu import mfu, step_flops

    from ecgfm_cli.model.config import preset
    from ecgfm_cli.model.encoder import EcgEncoder

    cfg = preset("base")
    with torch.device("meta"):
        enc = EcgEncoder(cfg)
    matmul_weights = sum(m.weight.numel() for m in enc.modules() if isinstance(m, nn.Linear))
    matmul_weights += enc.conv_pos.pos_conv[0].parametrizations.weight.original1.numel()
    f = step_flops(cfg)
    assert f.linear == 6 * 156 * matmul_weights == 6 * 156 * 89_849_856
    assert f.attention == 12 * 12 * 156**2 * 768
    assert 87e9 < f.total < 89e9 and f.head < 0.01 * f.total
    assert mfu(1000.0, 1e12, 2, 1000.0) == 0.5
    if not torch.cuda.is_available():
        res = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" /
                                                  "gpu_pretrain_mfu.py")], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and "CUDA is not available" in res.stderr


def test_init_from_an_official_fairseq_checkpoint(segments: Path, tmp_path: Path) -> None:
    """Continued pretraining from an ECG-FM release file (.pt, fairseq-signals layout; a random stand-in here):
    every tensor, the pretraining heads included, is loaded (lr 0 keeps them unchanged)."""
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hf_reference import fairseq_cfg_model, random_fairseq_state

    from ecgfm_cli.model.checkpoint import load_checkpoint
    from ecgfm_cli.model.config import preset

    cfg = preset("tiny")
    pt = tmp_path / "mimic_iv_ecg_physionet_pretrained.pt"
    torch.save({"cfg": {"model": fairseq_cfg_model(cfg)}, "model": random_fairseq_state(cfg, seed=4)}, pt)
    run = tmp_path / "run"
    invoke("pretrain", segments, "-o", run, "--init", pt, "--batch-size", "8", "--max-updates", "1", "--lr", "0",
           "--workers", "1", "--num-negatives", "20")
    before, after = load_checkpoint(pt).state_dict, load_checkpoint(run / "checkpoint-1").state_dict
    assert set(before) == set(after) and any(k.startswith("quantizer.") for k in after)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, msg=k)
