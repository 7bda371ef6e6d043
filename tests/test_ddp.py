"""DDP is exact: 2 processes x batch B == 1 process x batch 2B (gloo on CPU), loss normalised globally."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS, B = 3, 4
SPLIT = (0, 3, 2 * B)


def _noise_free_gumbel(logits, tau, generator=None):
    """Straight-through hard softmax without Gumbel noise: the same on any batch split."""
    soft = (logits / tau).softmax(dim=-1)
    hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(dim=-1, keepdim=True), 1.0)
    return hard - soft.detach() + soft


def _inputs():
    """Fixed per-step inputs for the whole 2B batch: x (lead masks already applied), time masks, negatives."""
    from ecgfm_cli.model.pretraining import compute_span_mask, sample_negative_indices

    g = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(STEPS):
        x = torch.randn(2 * B, 12, 2500, generator=g)
        x = x * (torch.rand(2 * B, 12, generator=g) >= 0.5)[:, :, None]  # a fixed random lead mask
        mask = compute_span_mask((2 * B, 156), generator=g)
        neg = sample_negative_indices(2 * B, int(mask[0].sum()), 10, generator=g)
        steps.append((x, mask, neg))
    return steps


def _run(rank: int, world: int, rendezvous: str, out: str, micro_batches: int = 1) -> None:
    """Train STEPS updates on this rank's slice of the fixed batches; rank 0 saves the parameters."""
    import ecgfm_cli.model.quantizer as quantizer
    from ecgfm_cli.train.distributed import cleanup, setup

    original = quantizer.gumbel_softmax_hard
    quantizer.gumbel_softmax_hard = _noise_free_gumbel
    env = dict(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), ECGFM_DIST_INIT=f"file://{rendezvous}")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model; and two spawned ranks share the cores
    try:
        _train(rank, world, out, micro_batches, setup("cpu"))
    finally:
        torch.set_num_threads(threads)
        quantizer.gumbel_softmax_hard = original
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        cleanup()


def _train(rank: int, world: int, out: str, micro_batches: int, ctx) -> None:
    from dataclasses import replace

    from ecgfm_cli.model.config import preset
    from ecgfm_cli.model.pretraining import PretrainConfig, Wav2Vec2Pretrainer
    from ecgfm_cli.train.pretrain import train_update

    torch.manual_seed(0)
    # The diversity loss is a batch statistic (perplexity of the batch-averaged softmax), so it legitimately
    # depends on the split; the contrastive sum and the feature penalty do not.
    cfg = PretrainConfig(cmsc=False, dropout_features=0.0, num_negatives=10, diversity_weight=0.0)
    model = Wav2Vec2Pretrainer(replace(preset("tiny").with_dropouts(0.0)), cfg)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    for step, (x, mask, neg) in enumerate(_inputs()):
        # UNEVEN splits (3 + 5 rows): only a loss normalised by the global masked-frame count gives the
        # same gradient as the single 2B batch (a per-rank mean would weight the ranks' frames differently).
        part = slice(*SPLIT[rank:rank + 2]) if world > 1 else slice(None)
        x, mask, neg = x[part], mask[part], neg[part]
        cuts = SPLIT if micro_batches > 1 else (0, x.shape[0])
        micro = [{"x": x[i:j], "record": torch.arange(j - i)} for i, j in zip(cuts[:-1], cuts[1:], strict=True)]
        fixed = [{"mask": mask[i:j], "negatives_idx": neg[i:j]} for i, j in zip(cuts[:-1], cuts[1:], strict=True)]
        train_update(model, net, opt, micro, ctx, lr=1e-3, fixed=fixed)
        model.set_num_updates(step + 1)
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)


@pytest.mark.slow
def test_two_processes_equal_one_with_double_batch(tmp_path: Path) -> None:
    single = tmp_path / "single.pt"
    _run(0, 1, "", str(single))
    double = tmp_path / "ddp.pt"
    torch.multiprocessing.spawn(_run, args=(2, str(tmp_path / "rendezvous"), str(double)), nprocs=2, join=True)
    accum = tmp_path / "accum.pt"
    _run(0, 1, "", str(accum), micro_batches=2)  # gradient accumulation: 2 x B in one process
    a, b, c = (torch.load(p, weights_only=True) for p in (single, double, accum))
    torch.manual_seed(0)
    from dataclasses import replace

    from ecgfm_cli.model.config import preset
    from ecgfm_cli.model.pretraining import PretrainConfig, Wav2Vec2Pretrainer

    init = Wav2Vec2Pretrainer(replace(preset("tiny").with_dropouts(0.0)), PretrainConfig()).state_dict()
    assert sum(not torch.equal(init[k], a[k]) for k in a) > 10  # training moved the weights
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"ddp {k}: {m}")
        torch.testing.assert_close(c[k], a[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"accum {k}: {m}")


@pytest.mark.slow
def test_cli_with_two_processes(tmp_path: Path, sample_data: Path) -> None:
    def cli(*args) -> subprocess.CompletedProcess:
        res = subprocess.run([sys.executable, "-m", "ecgfm_cli", *map(str, args)], capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        return res

    cli("ingest", sample_data, "--fs", "500", "-o", tmp_path / "records")
    cli("segment", tmp_path / "records", "-o", tmp_path / "segments")
    run = tmp_path / "run"
    res = cli("pretrain", tmp_path / "segments", "-o", run, "--procs", "2", "--preset", "tiny", "--batch-size", "4",
              "--max-updates", "4", "--log-every", "2", "--save-every", "2", "--num-negatives", "10",
              "--workers", "1", "--worker-processes", "--cmsc-gather")
    assert "2 rank(s)" in res.stderr
    from ecgfm_cli.train.runs import read_log

    log = read_log(run)
    assert [e["update"] for e in log] == [2, 4] and all(e["loss"] > 0 for e in log)
    state = torch.load(run / "checkpoint-4" / "trainer_state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and state["data"]["world_size"] == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # ranks draw different masks


def test_device_options_resolve_the_same_for_every_training_command(monkeypatch) -> None:
    """--device / --gpus / --procs: one rule for pretrain and finetune, each impossible combination one line."""
    from ecgfm_cli.console import UsageError
    from ecgfm_cli.train.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", None, None) == ("cpu", 1)
    assert resolve_device("auto", None, 2) == ("cpu", 2)
    no_cuda = "CUDA is not available"
    for args, message in [(("auto", 1, 2), "not both"), (("cpu", 2, None), "use --procs"),
                          (("cuda", None, None), no_cuda), (("auto", 1, None), no_cuda)]:
        with pytest.raises(UsageError, match=message):
            resolve_device(*args)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", None, None) == ("cuda", 1)
    assert resolve_device("auto", 2, None) == ("cuda", 2)
    assert resolve_device("auto", None, 2) == ("cpu", 2)  # --procs: CPU processes even with a GPU
    with pytest.raises(UsageError, match="only 2 GPU"):
        resolve_device("auto", 4, None)
    with pytest.raises(UsageError, match="--procs runs CPU processes"):
        resolve_device("cuda", None, 2)
