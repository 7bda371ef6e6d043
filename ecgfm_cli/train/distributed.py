"""Process groups for data-parallel training, the torchrun way.

The contract is torchrun's environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``. Under ``torchrun`` (or any launcher that sets them) :func:`launch` just calls the worker;
otherwise it starts ``nprocs`` local processes with ``torch.multiprocessing.spawn`` and sets the same
variables for them, so one code path serves ``--gpus 8``, ``--procs 2`` on CPU and multi-node runs.
A single-node spawn meets through a rendezvous file (``ECGFM_DIST_INIT=file://...``) instead of a TCP port,
so two jobs on one machine can never race for the same free port.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_launcher() -> bool:
    """True when a launcher (torchrun, SLURM wrappers) already set the torchrun variables."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(device: str, gpus: int | None, procs: int | None) -> tuple[str, int]:
    """The ``--device`` / ``--gpus`` / ``--procs`` options of a training command -> (``cpu`` or ``cuda``,
    processes on this node). ``auto`` is CUDA when ``--gpus`` is given, or when a GPU is visible and ``--procs``
    (CPU processes) is not; every impossible combination fails with one line."""
    from ecgfm_cli.console import fail

    if gpus is not None and procs is not None:
        fail("give --gpus (one process per GPU) or --procs (CPU processes), not both")
    if gpus is not None and device == "cpu":
        fail("--gpus with --device cpu: use --procs for CPU processes")
    dev = device
    if dev == "auto":
        dev = "cuda" if gpus is not None or (procs is None and torch.cuda.is_available()) else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        fail("--device cuda / --gpus: CUDA is not available here (torch " + torch.__version__ + ")")
    if procs is not None and dev == "cuda":
        fail("--procs runs CPU processes; use --gpus for GPUs")
    nprocs = gpus or procs or 1
    if dev == "cuda" and not under_launcher() and nprocs > torch.cuda.device_count():
        fail(f"--gpus {nprocs}: only {torch.cuda.device_count()} GPU(s) visible")
    return dev, nprocs


def launch(worker: Callable[..., None], args: tuple, nprocs: int = 1, nnodes: int = 1, node_rank: int = 0,
           master_addr: str = "127.0.0.1", master_port: int | None = None) -> None:
    """Run ``worker(*args)`` in every process of the job (see the module docstring)."""
    if under_launcher() or nprocs * nnodes == 1:
        worker(*args)
        return
    rendezvous = tempfile.mkdtemp(prefix="ecgfm-dist-") if nnodes == 1 and master_port is None else None
    init = f"file://{rendezvous}/store" if rendezvous else None
    port = master_port or 29500  # unused by a single-node spawn, which meets through the file
    try:
        torch.multiprocessing.spawn(_spawned, args=(worker, args, nprocs, nnodes, node_rank, master_addr, port, init),
                                    nprocs=nprocs, join=True)
    except torch.multiprocessing.ProcessRaisedException as e:
        # a rank's one-line error (console.fail) stays one line; anything else keeps its traceback
        marker = "ecgfm_cli.console.UsageError: "
        text = str(e)
        if marker not in text:
            raise
        from ecgfm_cli.console import fail

        fail(text.rsplit(marker, 1)[1].strip())
    finally:
        if rendezvous:
            shutil.rmtree(rendezvous, ignore_errors=True)


def _spawned(local_rank: int, worker: Callable[..., None], args: tuple, nprocs: int, nnodes: int,
             node_rank: int, master_addr: str, master_port: int, init: str | None = None) -> None:
    os.environ.update(RANK=str(node_rank * nprocs + local_rank), WORLD_SIZE=str(nprocs * nnodes),
                      LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR=master_addr,
                      MASTER_PORT=str(master_port))
    if init:
        os.environ["ECGFM_DIST_INIT"] = init
    os.environ["ECGFM_SPAWNED"] = "1"
    worker(*args)
    # Leave without C++ teardown (see cleanup): the parent only needs the exit status, and every file is closed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def setup(device: str) -> DistContext:
    """Join the process group named by the environment (NCCL on CUDA, gloo on CPU); ``device`` is
    ``cuda`` or ``cpu``. A single process without the variables gets a trivial context."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cpu")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device == "cpu" and local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Share the cores (as torchrun's OMP_NUM_THREADS=1 does): oversubscribed OpenMP threads spin-wait.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if device == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world,
                                init_method=os.environ.get("ECGFM_DIST_INIT", "env://"),
                                **({"device_id": dev} if device == "cuda" else {}))
    return DistContext(rank, world, local, dev)


def cleanup(completed: bool = True) -> None:
    """Leave the process group. After a normal finish every rank first waits for the others: a rank that
    tears gloo down while another still uses it can abort at exit ("terminate called without an active
    exception"). A rank that :func:`launch` spawned then leaves at once with ``os._exit``, skipping the
    teardown that the ranks, finishing it at different moments, could abort in (finetune's two-process test did,
    2 runs in ~25). After an error there is no barrier (the other ranks may be gone)."""
    if dist.is_available() and dist.is_initialized():
        if completed:
            dist.barrier()
            if os.environ.get("ECGFM_SPAWNED"):
                return
        dist.destroy_process_group()
