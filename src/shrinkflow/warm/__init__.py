"""Warm jobs: a `shrinkflow` job forked from a process that has already imported everything.

A DAG job is one `shrinkflow <stage>` process. Most of a small job's life used to be spent
importing torch, TensorFlow and MLflow (5-8 s of CPU each time) before it computed for a second
or two. The `shrinkflow` command (``client.main``) therefore hands a stage command to a **warm
server** of the same installation when one is running: a process that imported the frameworks,
MLflow and every stage module once, and forks one child per job. The child takes the job's
argv, working folder, environment, ``sys.path`` and standard streams, runs the CLI exactly as a
fresh process would, and its exit status (or the signal that killed it) becomes the command's.
The command blocks until then and passes SIGINT, SIGTERM and SIGHUP on to the child, so
Snakemake, `dvc repro` and a terminal see an ordinary process; if the command itself is killed,
the server stops the child.

Nothing has to be started: the first job that finds no server starts one in the background and
waits for it (its imports take as long as the job's own would; jobs that come meanwhile wait
too), then all are forked warm; if none comes, a job runs itself the ordinary way. A server
serves one installation in one import-time environment (``identity``): edited code, an
installed or removed package, or a change of a variable read at import (``TF_*``,
``PYTHON*``...) gives a new server; an idle one exits after ``SHRINKFLOW_WARM_IDLE`` seconds
(default 120). A job whose import-time environment
must differ (TensorFlow jobs that train irregular widths need oneDNN off before TensorFlow is
imported: ``backends.base.use_safe_training_kernels``) raises ``FreshImports`` in the warm
child, before it computes or writes anything, and the command runs it again where that
environment holds.

``SHRINKFLOW_WARM=0`` turns it off (every job a fresh process, as before); it is off inside a
Slurm allocation, where each job has its own node share and nothing would be reused, and on a
machine with an NVIDIA GPU (``NVIDIA_DEVICE``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

ENV = "SHRINKFLOW_WARM"
IDLE_ENV = "SHRINKFLOW_WARM_IDLE"
# Seconds a server with no job waits for the next one: a DAG's next job comes within seconds
# (Snakemake schedules as jobs finish; `dvc repro` runs stages back to back); longer only keeps
# its memory (about 1.5 GB, shared with its children) for nothing.
DEFAULT_IDLE_S = 120.0

# Set in a warm child (server.run_child) before the CLI runs.
IN_WARM_CHILD = False


class FreshImports(BaseException):  # noqa: N818 - a request, not an error
    """Raised in a warm child by a job that needs ``env`` set before its frameworks are
    imported; the command runs the job again where that holds. A BaseException so that no
    ``except Exception`` on the way (the CLI's error lines, a tracking run's failure handler)
    takes it for a failure."""

    def __init__(self, env: Mapping[str, str]) -> None:
        super().__init__(dict(env))
        self.env = dict(env)


# Present on a machine with an NVIDIA GPU and its driver. CUDA cannot be used in a process
# forked after the driver was initialised, and importing TensorFlow initialises it (it lists
# its devices), so no server is used there: a GPU job's import is a small share of its time.
NVIDIA_DEVICE = "/dev/nvidiactl"


def enabled(environ: Mapping[str, str]) -> bool:
    """Whether jobs go to a warm server: ``SHRINKFLOW_WARM`` unset or 1/on/true (0/off/false
    turn it off), not inside a Slurm allocation, and no NVIDIA GPU on this machine."""
    value = environ.get(ENV, "").strip().lower()
    if value in ("0", "off", "false", "no"):
        return False
    return "SLURM_JOB_ID" not in environ and not os.path.exists(NVIDIA_DEVICE)


def require_imported_with(names: Iterable[str]) -> None:
    """Called by a job that has just set the variables ``names`` in ``os.environ``, which its
    framework reads at import: in a warm child the frameworks were imported earlier, under the
    server's environment, which lacked them (it is part of the server's identity), so the job
    is handed back to run where they hold."""
    if IN_WARM_CHILD:
        raise FreshImports({name: os.environ[name] for name in names})
