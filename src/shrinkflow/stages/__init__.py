"""One module per pipeline stage: validate inputs, open the MLflow run, write outputs atomically.

The real work happens in shrinkflow.data and shrinkflow.backends; these wrappers add lineage
(the run that produced a job's input is its parent) and the per-node bookkeeping files.
"""
