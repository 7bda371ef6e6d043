"""Process groups for data-parallel training, the torchrun way.

The contract is torchrun's environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``. Under ``torchrun`` (or any launcher that sets them) :func:`launch` just calls the worker;
otherwise it starts ``nprocs`` local processes with ``torch.multiprocessing.spawn`` and sets the same
variables for them, so one code path serves ``--gpus 8``, ``--procs 2`` on CPU and multi-node runs.
A single-node spawn meets through a rendezvous file (``ECGFM_DIST_INIT=file://...``) instead of a TCP port,
so two jobs on one machine can never race for the same free port.

A rank whose peers stop answering (a process or node died, or stalled) does not hang: every collective, and the
start-up rendezvous, gives up after ``ECGFM_DIST_TIMEOUT`` seconds (default :data:`DEFAULT_TIMEOUT_S`), and the
error from the process group ends the run with one line (:func:`peer_failure`) instead of a traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ecgfm_cli.train.options import MULTI_NODE_PORT, LaunchOptions

_LAUNCH = LaunchOptions()  # launch's defaults: ecgfm pretrain's

#: Seconds a rank waits in a collective or at the rendezvous before it gives up on the others (``ECGFM_DIST_TIMEOUT``
#: overrides). Longer than any step one rank takes alone (rank 0 writing a checkpoint), short enough that a dead
#: node costs minutes, not a SLURM allocation.
DEFAULT_TIMEOUT_S = 600.0


def dist_timeout() -> float:
    """The process-group timeout in seconds: ``ECGFM_DIST_TIMEOUT`` or :data:`DEFAULT_TIMEOUT_S`."""
    from ecgfm_cli.errors import EcgfmError

    text = os.environ.get("ECGFM_DIST_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise EcgfmError(f"ECGFM_DIST_TIMEOUT={text!r}: expected a number of seconds > 0")
    return value


def peer_failure(error: BaseException) -> str | None:
    """One line for an error of the process group (a peer's connection closed, a collective timed out), or None
    when ``error`` is something else. Says which rank saw it and how to continue."""
    text = str(error)
    # gloo's timeout inside a backward surfaces as "Application timeout caused pair closure", no name in it
    if not (isinstance(error, dist.DistError)
            or re.search(r"gloo|NCCL|ProcessGroup|c10d|pair closure|Application timeout", text)):
        return None
    why = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    why = re.sub(r"^\[[^\]]*\]\s*", "", why)  # the C++ source location
    why = why.split(". This is typically")[0].rstrip(".")[:160]
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    return (f"rank {rank} of {world} lost the other processes of the job ({why}): one of them died or stalled "
            f"longer than the {dist_timeout():g} s timeout (ECGFM_DIST_TIMEOUT); see the logs of the other "
            "node(s), then rerun the same command on every node (pretrain: with --resume, to continue from the "
            "last checkpoint)")


def _guarded(worker: Callable[..., None], args: tuple) -> None:
    """``worker(*args)``, a process-group failure turned into one line (:func:`peer_failure`)."""
    try:
        worker(*args)
    except RuntimeError as e:
        line = peer_failure(e)
        if line is None:
            raise
        from ecgfm_cli.errors import EcgfmError

        raise EcgfmError(line) from e


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
    """The ``--device`` / ``--gpus`` / ``--procs`` options of pretrain, finetune and embed -> (``cpu`` or ``cuda``,
    processes on this node). ``auto`` is CUDA when ``--gpus`` is given, or when a GPU is visible and ``--procs``
    (CPU processes) is not; every impossible combination fails with one line."""
    from ecgfm_cli.errors import EcgfmError

    if gpus is not None and procs is not None:
        raise EcgfmError("give --gpus (one process per GPU) or --procs (CPU processes), not both")
    if gpus is not None and device == "cpu":
        raise EcgfmError("--gpus with --device cpu: use --procs for CPU processes")
    dev = device
    if dev == "auto":
        dev = "cuda" if gpus is not None or (procs is None and torch.cuda.is_available()) else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        raise EcgfmError("--device cuda / --gpus: CUDA is not available here (torch " + torch.__version__ + ")")
    if procs is not None and dev == "cuda":
        raise EcgfmError("--procs runs CPU processes; use --gpus for GPUs")
    nprocs = gpus or procs or 1
    if dev == "cuda" and not under_launcher() and nprocs > torch.cuda.device_count():
        raise EcgfmError(f"--gpus {nprocs}: only {torch.cuda.device_count()} GPU(s) visible")
    return dev, nprocs


def launch(worker: Callable[..., None], args: tuple, nprocs: int = 1, nnodes: int = _LAUNCH.nnodes,
           node_rank: int = _LAUNCH.node_rank, master_addr: str = _LAUNCH.master_addr,
           master_port: int | None = _LAUNCH.master_port) -> None:
    """Run ``worker(*args)`` in every process of the job (see the module docstring)."""
    if under_launcher() or nprocs * nnodes == 1:
        _guarded(worker, args)
        return
    rendezvous = tempfile.mkdtemp(prefix="ecgfm-dist-") if nnodes == 1 and master_port is None else None
    init = f"file://{rendezvous}/store" if rendezvous else None
    port = master_port or MULTI_NODE_PORT  # unused by a single-node spawn, which meets through the file
    try:
        torch.multiprocessing.spawn(_spawned, args=(worker, args, nprocs, nnodes, node_rank, master_addr, port, init,
                                                    os.getpid()), nprocs=nprocs, join=True)
    except torch.multiprocessing.ProcessRaisedException as e:
        # a rank's one-line error (EcgfmError) stays one line; anything else keeps its traceback
        marker = "ecgfm_cli.errors.EcgfmError: "
        text = str(e)
        if marker not in text:
            raise
        from ecgfm_cli.errors import EcgfmError

        raise EcgfmError(text.rsplit(marker, 1)[1].strip()) from e
    except torch.multiprocessing.ProcessExitedException as e:  # killed by a signal (the OOM killer, scancel)
        from ecgfm_cli.errors import EcgfmError

        how = f"was killed by {e.signal_name}" if e.signal_name else f"exited with status {e.exit_code}"
        raise EcgfmError(f"rank {node_rank * nprocs + e.error_index} of {nprocs * nnodes} {how} (out of memory? see "
                         "the system log); the other processes of this node were stopped; rerun the same command "
                         "(pretrain: with --resume, to continue from the last checkpoint)") from e
    finally:
        if rendezvous:
            shutil.rmtree(rendezvous, ignore_errors=True)


def die_with(parent: int) -> None:
    """Linux: have the kernel SIGKILL this process when the process that spawned it ends, however it ends (a
    launcher killed with SIGKILL cannot stop its ranks itself, and an orphaned rank would train on, holding its
    cores or GPU). ``parent``: that process's pid, to catch a parent that died before the request was made."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _spawned(local_rank: int, worker: Callable[..., None], args: tuple, nprocs: int, nnodes: int,
             node_rank: int, master_addr: str, master_port: int, init: str | None = None,
             launcher: int | None = None) -> None:
    if launcher is not None:
        die_with(launcher)
    os.environ.update(RANK=str(node_rank * nprocs + local_rank), WORLD_SIZE=str(nprocs * nnodes),
                      LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR=master_addr,
                      MASTER_PORT=str(master_port))
    if init:
        os.environ["ECGFM_DIST_INIT"] = init
    os.environ["ECGFM_SPAWNED"] = "1"
    from ecgfm_cli.errors import EcgfmError

    try:
        _guarded(worker, args)
    except EcgfmError as e:  # any of the family, under the one name launch() looks for in the rank's traceback
        if type(e) is EcgfmError:
            raise
        raise EcgfmError(str(e)) from e
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
                                timeout=timedelta(seconds=dist_timeout()),
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
