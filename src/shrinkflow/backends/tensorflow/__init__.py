"""The TensorFlow backend (tf-keras, tensorflow-model-optimization, TFLite): one module per job
(``shrinkflow.backends.base.JOB_MODULES``).

Stages reach a job module through ``shrinkflow.backends.base.backend_module``, which imports it
(and TensorFlow, ~10 s to import) only when that job runs, so a torch job never pays for it.
torch is never imported here (ruff.toml beside this file bans it).

This package's import is where TensorFlow starts in every process that runs a job (a
`shrinkflow` command under Snakemake, DVC or a shell, a distributed worker): Python imports it
before any of its modules. It sets, unless the environment already does,
``TF_USE_LEGACY_KERAS=1`` (tfmot's pruning wrappers need Keras 2, the ``tf_keras`` package) and
``TF_CPP_MIN_LOG_LEVEL=2`` (warnings and errors only; export 0 to see TensorFlow's info lines),
then imports TensorFlow and queries its devices with stderr filtered
(``shrinkflow.backends.native_log``): the start-up lines no setting silences, and the cuInit
error of a machine without a GPU, do not reach a job's log; errors do. (The same
``os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")`` atop each module here is therefore
redundant.) Listing the devices does not start TensorFlow's runtime: thread counts and logical
devices can still be configured after it, and ``use_job_threads`` does, for the job's threads.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from shrinkflow.backends.native_log import filtered_stderr  # noqa: E402

with filtered_stderr():
    import tensorflow as tf

    tf.config.list_physical_devices()  # cuInit, on a GPU machine before any device is in use

from shrinkflow.backends.base import job_threads  # noqa: E402


def use_job_threads() -> None:
    """Compute with the job's threads (``OMP_NUM_THREADS``, which Snakemake sets to the
    rule's threads and TensorFlow itself ignores): intra- and inter-op pools, and TFLite's
    interpreters (``tflite.default_threads``). Before the runtime starts; unset: every CPU."""
    threads = job_threads()
    if threads is not None:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


use_job_threads()
