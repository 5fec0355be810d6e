"""The PyTorch backend: one module per job (``shrinkflow.backends.base.JOB_MODULES``).

Stages reach a job module through ``shrinkflow.backends.base.backend_module``, which imports it
(and torch) only when that job runs. TensorFlow is never imported here (ruff.toml beside this
file bans it).
"""
