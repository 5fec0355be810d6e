"""PyTorch data parallelism for `shrinkflow train`: DDP in processes started by torchrun.

``launch`` re-runs the `shrinkflow` command under torchrun (``torch.distributed.run``, in this
process: it becomes torchrun's agent), so Snakemake and DVC keep one command line. Each worker
finds itself a worker by the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``), joins the process group (NCCL when CUDA is available, one GPU per worker; gloo
on CPU) and trains its share of every global batch.

Nothing listens beyond this node's loopback: torchrun's own rendezvous (``--standalone``: c10d)
serves its TCPStores on every interface, and a TCPStore takes no address to bind, so the agent
uses ``LoopbackRendezvous`` instead, whose one store is served from a socket bound to 127.0.0.1
(the workers connect to it, ``TORCHELASTIC_USE_AGENT_STORE``); gloo and NCCL open theirs on the
loopback interface (``workers.collectives_on_loopback``).
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
    rendezvous_handler_registry,
)

from shrinkflow.backends.workers import LOOPBACK, collectives_on_loopback, die_with_parent
from shrinkflow.errors import ShrinkflowError

CLI_MODULE = "shrinkflow.cli"
RENDEZVOUS_BACKEND = "shrinkflow-loopback"
RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=10)  # torchrun's static rendezvous' default


class LoopbackRendezvous(RendezvousHandler):
    """The rendezvous of one node's workers: a TCPStore that listens on 127.0.0.1 only.

    torchrun's agent calls ``next_rendezvous`` and hands the store's address to its workers as
    ``MASTER_ADDR``/``MASTER_PORT``; as ``use_agent_store`` is true, they connect to it instead
    of serving a store of their own. The store is given a socket bound here
    (``master_listen_fd``): a TCPStore asked for a port alone binds it on every interface.
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._store: dist.TCPStore | None = None

    def get_backend(self) -> str:
        return RENDEZVOUS_BACKEND

    @property
    def use_agent_store(self) -> bool:
        return True

    def next_rendezvous(self) -> RendezvousInfo:
        if self._store is None:
            listener = socket.create_server((LOOPBACK, 0))
            port = listener.getsockname()[1]
            self._store = dist.TCPStore(
                LOOPBACK,
                port,
                world_size=1,  # the agent: the one node of the rendezvous
                is_master=True,
                timeout=RENDEZVOUS_TIMEOUT,
                multi_tenant=True,
                master_listen_fd=listener.detach(),  # the store owns the socket from here on
            )
        store = dist.PrefixStore(self.run_id, self._store)
        return RendezvousInfo(store, 0, 1, RendezvousStoreInfo(LOOPBACK, self._store.port))

    def is_closed(self) -> bool:
        return False

    def set_closed(self) -> None:
        pass

    def num_nodes_waiting(self) -> int:
        return 0

    def get_run_id(self) -> str:
        return self.run_id

    def shutdown(self) -> bool:
        return True


def _loopback_rendezvous(params: RendezvousParameters) -> RendezvousHandler:
    return LoopbackRendezvous(params.run_id)


def worker_rank() -> int | None:
    """This process's global rank when a torchrun-style launcher started it, else None."""
    if not {"RANK", "WORLD_SIZE", "LOCAL_RANK"} <= os.environ.keys():
        return None
    return int(os.environ["RANK"])


def launch(argv: Sequence[str], processes: int) -> None:
    """Run ``shrinkflow *argv`` in ``processes`` torchrun workers on this node; return when all
    have succeeded, raise a one-line ShrinkflowError when one failed (torchrun then stops the
    others; each worker has printed its own error)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        raise ShrinkflowError(
            f"train.distributed.processes: {processes} is more than the "
            f"{torch.cuda.device_count()} GPU(s) of this node (NCCL needs one GPU per process)"
        )
    rendezvous_handler_registry.register(RENDEZVOUS_BACKEND, _loopback_rendezvous)
    try:
        # torchrun keeps its own logs in a fresh temporary folder that it never deletes.
        with tempfile.TemporaryDirectory(prefix="shrinkflow-torchrun-") as logs:
            torchrun(
                get_args_parser().parse_args(
                    [
                        "--nnodes=1",
                        f"--nproc-per-node={processes}",
                        f"--rdzv-backend={RENDEZVOUS_BACKEND}",
                        f"--rdzv-endpoint={LOOPBACK}",  # not used: the handler binds its own
                        f"--rdzv-id=shrinkflow-{os.getpid()}",
                        f"--log-dir={logs}",
                        "--module",
                        CLI_MODULE,
                        *argv,
                    ]
                )
            )
    except ChildFailedError as e:
        failed = ", ".join(
            f"rank {rank} exit code {failure.exitcode}"
            for rank, failure in sorted(e.failures.items())
        )
        raise ShrinkflowError(f"train: torchrun worker(s) failed ({failed})") from None


@contextmanager
def process_group() -> Iterator[None]:
    """The default process group for the block when this process is a torchrun worker (and
    none exists yet); a no-op otherwise. Destroyed on the way out."""
    if worker_rank() is None or dist.is_initialized():
        yield
        return
    die_with_parent()  # torchrun starts workers in sessions of their own
    collectives_on_loopback()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank_and_size() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device_of_worker() -> str:
    """The device a worker trains on: its GPU (set by ``process_group``) or the CPU."""
    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel: gradients averaged over the processes after every
    backward, buffers (BatchNorm statistics) broadcast from rank 0 before every forward."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def sum_over_processes(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over all processes (in place, and returned)."""
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def check_same(value: int, what: str) -> None:
    """Raise on every process unless all of them hold the same ``value`` (say, the epoch they
    resume from: each reads rank 0's resume state, and must have read the same one)."""
    mine = torch.tensor([value, -value], dtype=torch.long)
    if dist.get_backend() == "nccl":
        mine = mine.cuda()
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    if int(mine[0]) != -int(mine[1]):
        raise ShrinkflowError(
            f"train: the processes disagree on {what} ({-int(mine[1])}..{int(mine[0])}); "
            "is the resume folder on a file system all of them see?"
        )
