"""DDP is exact: 2 processes x batch B == 1 process x batch 2B (gloo on CPU), loss normalised globally."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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
    from ecgfm_cli.errors import EcgfmError
    from ecgfm_cli.train.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", None, None) == ("cpu", 1)
    assert resolve_device("auto", None, 2) == ("cpu", 2)
    no_cuda = "CUDA is not available"
    for args, message in [(("auto", 1, 2), "not both"), (("cpu", 2, None), "use --procs"),
                          (("cuda", None, None), no_cuda), (("auto", 1, None), no_cuda)]:
        with pytest.raises(EcgfmError, match=message):
            resolve_device(*args)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", None, None) == ("cuda", 1)
    assert resolve_device("auto", 2, None) == ("cuda", 2)
    assert resolve_device("auto", None, 2) == ("cpu", 2)  # --procs: CPU processes even with a GPU
    with pytest.raises(EcgfmError, match="only 2 GPU"):
        resolve_device("auto", 4, None)
    with pytest.raises(EcgfmError, match="--procs runs CPU processes"):
        resolve_device("cuda", None, 2)


# ------------------------------------------------------------------------------------ several nodes, simulated
# Two nodes on one machine (gloo over localhost): the same command started twice with --nnodes 2 --node-rank 0|1,
# and the same through torchrun's c10d rendezvous. Each process gets one thread (two "nodes" share the cores).

NODE_ARGS = ("--preset", "tiny", "--batch-size", "4", "--log-every", "1", "--save-every", "2", "--num-negatives",
             "10", "--workers", "1", "--seed", "3")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT", "ECGFM_DIST_INIT")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _node(args: list, log: Path, env: dict[str, str], torchrun: list | None = None) -> subprocess.Popen:
    """One simulated node: its own session, so that the whole node (launcher and ranks) can be stopped or killed."""
    cmd = [*(torchrun or [sys.executable]), "-m", "ecgfm_cli", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env, start_new_session=True)


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _wait(procs: list[subprocess.Popen], timeout: float = 240) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        _kill(procs)


def _losses(run: Path) -> dict[int, float]:
    from ecgfm_cli.train.runs import read_log

    return {e["update"]: e["loss"] for e in read_log(run)}


@pytest.fixture(scope="module")
def node_segments(sample_data: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nodes")
    for args in (("ingest", sample_data, "--fs", "500", "-o", root / "records"),
                 ("segment", root / "records", "-o", root / "segments")):
        res = subprocess.run([sys.executable, "-m", "ecgfm_cli", *map(str, args)], capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr
    return root / "segments"


@pytest.fixture(scope="module")
def one_node_losses(node_segments: Path, tmp_path_factory) -> dict[int, float]:
    """The reference: one node, two processes (--procs 2), the same seed and global batch."""
    run = tmp_path_factory.mktemp("one-node") / "run"
    res = subprocess.run([sys.executable, "-m", "ecgfm_cli", "pretrain", node_segments, "-o", run, "--procs", "2",
                          "--max-updates", "6", *NODE_ARGS], capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 7))
    return losses


def _assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert got and set(got) <= set(want)
    for u, loss in got.items():  # not to the bit: another thread count per process reorders float sums
        assert loss == pytest.approx(want[u], rel=1e-5), (u, loss, want[u])


@pytest.mark.slow
def test_two_nodes_equal_one_node_and_a_stalled_node_ends_the_run(node_segments, one_node_losses, tmp_path):
    """--nnodes 2 --node-rank 0|1 trains as --procs 2 does; when node 1 stops answering, node 0 ends after the
    process-group timeout with one line instead of hanging, and --resume on both nodes continues the run."""
    run = tmp_path / "run"
    timeout = 15

    def start(*extra) -> list[subprocess.Popen]:
        port = _free_port()
        return [_node(["pretrain", node_segments, "-o", run, "--nnodes", "2", "--node-rank", r, "--master-port", port,
                       "--procs", "1", *NODE_ARGS, *extra], tmp_path / f"node{r}.log",
                      _env(ECGFM_DIST_TIMEOUT=str(timeout))) for r in (0, 1)]

    node0, node1 = start("--max-updates", "400")  # far more than it reaches before node 1 is stopped
    try:
        for _ in range(2400):
            if (run / "checkpoint-2").is_dir() or node0.poll() is not None:
                break
            time.sleep(0.05)
        assert (run / "checkpoint-2").is_dir(), (tmp_path / "node0.log").read_text()
        os.killpg(node1.pid, signal.SIGSTOP)  # the node hangs (it does not even close its sockets)
        t0 = time.monotonic()
        code = node0.wait(timeout=timeout + 90)
        waited = time.monotonic() - t0
    finally:
        _kill([node0, node1])
    err = (tmp_path / "node0.log").read_text()
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert "rank 0 of 2 lost the other processes" in errors[0] and "--resume" in errors[0]
    assert waited >= timeout - 1  # it waited for the timeout, not longer than needed (bounded above by wait())
    before = _losses(run)
    assert 2 in before

    assert _wait(start("--max-updates", "6", "--resume")) == [0, 0], (tmp_path / "node0.log").read_text()
    after = _losses(run)
    assert max(after) == 6
    _assert_same_losses(after, one_node_losses)


@pytest.mark.slow
def test_torchrun_two_nodes_equal_one_node_and_resume(node_segments, one_node_losses, tmp_path):
    """The same job through torchrun: two agents meet at a c10d rendezvous on localhost (--nnodes 2,
    --nproc-per-node 1), train, checkpoint, and a second pair resumes from the checkpoint."""
    torchrun_bin = Path(sys.executable).with_name("torchrun")
    assert torchrun_bin.exists()
    run = tmp_path / "run"

    def pair(*extra) -> list[int]:
        port = _free_port()
        launcher = [str(torchrun_bin), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", f"ecgfm-{port}"]
        return _wait([_node(["pretrain", node_segments, "-o", run, *NODE_ARGS, *extra], tmp_path / f"agent{a}.log",
                            _env(), torchrun=launcher) for a in (0, 1)])

    assert pair("--max-updates", "4") == [0, 0], (tmp_path / "agent0.log").read_text()
    state = torch.load(run / "checkpoint-4" / "trainer_state.pt", weights_only=True)
    assert state["data"]["world_size"] == 2
    assert pair("--max-updates", "6", "--resume") == [0, 0], (tmp_path / "agent0.log").read_text()
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 7))
    _assert_same_losses(losses, one_node_losses)


def test_a_lost_peer_is_one_line_and_the_timeout_is_settable(monkeypatch) -> None:
    from ecgfm_cli.errors import EcgfmError
    from ecgfm_cli.train import distributed

    monkeypatch.delenv("ECGFM_DIST_TIMEOUT", raising=False)
    assert distributed.dist_timeout() == distributed.DEFAULT_TIMEOUT_S
    monkeypatch.setenv("ECGFM_DIST_TIMEOUT", "42.5")
    assert distributed.dist_timeout() == 42.5
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv("ECGFM_DIST_TIMEOUT", bad)
        with pytest.raises(EcgfmError, match="ECGFM_DIST_TIMEOUT"):
            distributed.dist_timeout()
    monkeypatch.setenv("ECGFM_DIST_TIMEOUT", "30")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    closed = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                          "[10.0.0.2]:7578. This is typically caused by a remote worker crashing. Check the logs")
    line = distributed.peer_failure(closed)
    assert line.startswith("rank 3 of 8 lost the other processes of the job (Connection closed by peer "
                           "[10.0.0.2]:7578)") and "30 s timeout" in line and "\n" not in line

    def dies() -> None:
        raise closed

    with pytest.raises(EcgfmError, match="rank 3 of 8 lost"):
        distributed._guarded(dies, ())
    # gloo's timeout raised inside a backward names neither gloo nor the process group
    stalled = distributed.peer_failure(RuntimeError("Application timeout caused pair closure"))
    assert stalled is not None and stalled.startswith("rank 3 of 8 lost the other processes of the job "
                                                      "(Application timeout caused pair closure)")
    assert distributed.peer_failure(RuntimeError("shape mismatch")) is None  # a bug keeps its traceback
    with pytest.raises(RuntimeError, match="shape mismatch"):
        distributed._guarded(lambda: (_ for _ in ()).throw(RuntimeError("shape mismatch")), ())


def _killed_rank(seconds: float) -> None:
    """Rank 1 is killed as the OOM killer would; rank 0 would go on for ``seconds``."""
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(seconds)


def test_a_killed_local_rank_is_one_line() -> None:
    from ecgfm_cli.errors import EcgfmError
    from ecgfm_cli.train.distributed import launch

    t0 = time.monotonic()
    with pytest.raises(EcgfmError, match="rank 1 of 2 was killed by SIGKILL") as e:
        launch(_killed_rank, (60.0,), nprocs=2)
    assert "\n" not in str(e.value) and time.monotonic() - t0 < 50  # the other rank was stopped, not waited for
