"""The TensorFlow backend (tf-keras, tensorflow-model-optimization, TFLite): one module per job
(``shrinkflow.backends.base.JOB_MODULES``).

Stages reach a job module through ``shrinkflow.backends.base.backend_module``, which imports it
(and TensorFlow, ~10 s to import) only when that job runs, so a torch job never pays for it.
Every module sets ``TF_USE_LEGACY_KERAS=1`` before importing TensorFlow: tfmot's pruning
wrappers need Keras 2 (the ``tf_keras`` package). torch is never imported here (ruff.toml
beside this file bans it).
"""
