"""TensorFlow data parallelism for `shrinkflow train`: N replicas in one worker process.

``launch`` re-runs the `shrinkflow` command in one worker process told (``REPLICAS_ENV``) to
train ``train.distributed.processes`` data-parallel replicas; ``train.distribution_strategy``
then builds a ``MirroredStrategy`` over that many devices: one GPU each, or as many logical
devices split from the CPU. The replicas take interleaved, weighted shares of every global batch,
as data-parallel workers would (see ``train``).

Why not ``MultiWorkerMirroredStrategy`` workers, one process each: every worker serves
TensorFlow's gRPC server (graph execution, collectives, coordination: anyone who can connect
can run ops in it), and TensorFlow binds it to ``0.0.0.0:port`` (IPv4 and IPv6), hard-coded in
``GrpcServer::Init`` with no option to choose the address (``TF_CONFIG``'s host names only say
where to connect). On one node, which is all that ``launch`` serves, a ``MirroredStrategy``
gives the same synchronous data parallelism with no listening socket at all, and NCCL's own
sockets are kept on the loopback interface (``workers.collectives_on_loopback``). No TensorFlow
import here: the launching process only starts and watches the worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

from shrinkflow.backends.workers import die_with_parent
from shrinkflow.errors import ShrinkflowError

CLI_MODULE = "shrinkflow.cli"
# Set by ``launch`` in its worker: the number of replicas it trains. Its own variable, so that
# nothing the user exported for another purpose (TF_CONFIG) turns a plain run into this one.
REPLICAS_ENV = "SHRINKFLOW_TF_REPLICAS"
POLL_SECONDS = 0.2


def worker_rank() -> int | None:
    """0 in the worker that ``launch`` started (it does all that a single process does),
    else None."""
    return 0 if REPLICAS_ENV in os.environ else None


def replicas() -> int:
    """The data-parallel replicas this process trains: ``launch``'s count in its worker, else 1
    (a plain run; ``MirroredStrategy`` over several GPUs still splits each batch among them)."""
    return int(os.environ.get(REPLICAS_ENV, "1"))


def launch(argv: Sequence[str], processes: int) -> None:
    """Run ``shrinkflow *argv`` in one worker that trains ``processes`` replicas, and wait for
    it; raise a one-line ShrinkflowError when it fails (it has printed its own error)."""
    with ExitStack() as stack:
        stack.enter_context(_sigterm_exits())
        env = {**os.environ, REPLICAS_ENV: str(processes)}
        worker = subprocess.Popen(
            [sys.executable, "-m", CLI_MODULE, *argv], env=env, preexec_fn=die_with_parent
        )
        stack.callback(_stop, worker)
        while worker.poll() is None:
            time.sleep(POLL_SECONDS)
    if worker.returncode:
        raise ShrinkflowError(
            f"train: the TensorFlow worker failed (exit code {worker.returncode})"
        )


def _stop(worker: subprocess.Popen) -> None:
    """Terminate the worker if it still runs, and wait for it."""
    if worker.poll() is None:
        worker.terminate()
    worker.wait()


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM (Snakemake, Slurm) becomes SystemExit(143), so the worker is stopped too."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
