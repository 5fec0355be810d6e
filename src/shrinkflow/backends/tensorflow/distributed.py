"""TensorFlow data parallelism for `shrinkflow train`: MultiWorkerMirroredStrategy workers.

``launch`` re-runs the `shrinkflow` command in N worker processes on this node, each with a
``TF_CONFIG`` naming all N on free 127.0.0.1 ports and its own index; worker 0 is the chief.
``train.distribution_strategy`` then builds a ``MultiWorkerMirroredStrategy`` (collectives
chosen by TensorFlow: NCCL on GPUs, ring on CPU). No TensorFlow import here: the launching
process only starts and watches the workers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

from shrinkflow.backends.workers import die_with_parent
from shrinkflow.errors import ShrinkflowError

CLI_MODULE = "shrinkflow.cli"
# Set by ``launch`` in its workers: a TF_CONFIG the user exported for another purpose must not
# turn a plain run into a multi-worker one.
WORKER_ENV = "SHRINKFLOW_TF_WORKER"
POLL_SECONDS = 0.2


def worker_rank() -> int | None:
    """This process's worker index (0: the chief) when ``launch`` started it, else None."""
    if os.environ.get(WORKER_ENV) != "1":
        return None
    return int(json.loads(os.environ["TF_CONFIG"])["task"]["index"])


def rank_and_size() -> tuple[int, int]:
    """(worker index, number of workers) of a ``launch`` worker; (0, 1) otherwise."""
    rank = worker_rank()
    if rank is None:
        return 0, 1
    return rank, len(json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"])


def launch(argv: Sequence[str], processes: int) -> None:
    """Run ``shrinkflow *argv`` in ``processes`` workers and wait for them; when one fails, stop
    the others (they would wait for it forever) and raise a one-line ShrinkflowError."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(processes)]}
    with ExitStack() as stack:
        stack.enter_context(_sigterm_exits())
        workers: list[subprocess.Popen] = []
        stack.callback(_stop, workers)
        for index in range(processes):
            task = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            env = {**os.environ, WORKER_ENV: "1", "TF_CONFIG": json.dumps(task)}
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-m", CLI_MODULE, *argv], env=env, preexec_fn=die_with_parent
                )
            )
        # Until all have ended, or one has failed (the others would wait for it forever).
        while any(w.poll() is None for w in workers) and not any(w.returncode for w in workers):
            time.sleep(POLL_SECONDS)
        failed = [(i, w.returncode) for i, w in enumerate(workers) if w.returncode]
    if failed:
        which = ", ".join(f"worker {i} exit code {code}" for i, code in failed)
        raise ShrinkflowError(f"train: TensorFlow worker(s) failed ({which})")


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now (bound together, then freed)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _stop(workers: list[subprocess.Popen]) -> None:
    """Terminate the workers still running, and wait for all of them."""
    for w in workers:
        if w.poll() is None:
            w.terminate()
    for w in workers:
        w.wait()


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM (Snakemake, Slurm) becomes SystemExit(143), so the workers are stopped too."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
