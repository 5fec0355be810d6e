"""The PyTorch backend: one module per job (``shrinkflow.backends.base.JOB_MODULES``).

Stages reach a job module through ``shrinkflow.backends.base.backend_module``, which imports it
(and torch) only when that job runs. TensorFlow is never imported here (ruff.toml beside this
file bans it).
"""

import torch

from shrinkflow.backends.base import job_threads


def use_job_threads() -> None:
    """Compute with the job's threads (``OMP_NUM_THREADS``: torch reads it when it loads, so
    this matters where torch was loaded before the job had its environment: a warm child)."""
    threads = job_threads()
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
