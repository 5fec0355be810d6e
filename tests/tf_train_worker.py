"""Run the TensorFlow train_model in its own process, so a test can SIGKILL a real training job.

Usage: python tf_train_worker.py DATA.npz CFG.json OUT_DIR RESUME_DIR RUN_ID INTRA INTER
       [PAUSE_EPOCH]

DATA.npz holds the arrays of a PreparedData (written by the test, loaded without pickles).
INTRA/INTER are TensorFlow's thread counts (0: its default), those of the test process, whose
weights the job's are compared with. With PAUSE_EPOCH the job sleeps inside that epoch's
callback, i.e. after training the epoch but before its resume state is saved, which gives the
test a deterministic moment to kill it. On success the TrainResult is printed as JSON.
"""

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf  # noqa: E402
from data_fixtures import load_data_file  # noqa: E402

from shrinkflow.backends.base import JobContext  # noqa: E402
from shrinkflow.backends.tensorflow.train import train_model  # noqa: E402


def main() -> None:
    data_file, cfg_file, out_dir, resume_dir, run_id, intra, inter = sys.argv[1:8]
    pause_epoch = int(sys.argv[8]) if len(sys.argv) > 8 else 0
    tf.config.threading.set_intra_op_parallelism_threads(int(intra))
    tf.config.threading.set_inter_op_parallelism_threads(int(inter))
    data = load_data_file(Path(data_file))

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == pause_epoch:
            time.sleep(600)

    cfg = json.loads(Path(cfg_file).read_text())
    result = train_model(
        cfg, "resnet20", data, JobContext(Path(out_dir), Path(resume_dir), on_epoch, run_id)
    )
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
