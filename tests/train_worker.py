"""Run train_model in its own process, so a test can SIGKILL a real training job.

Usage: python train_worker.py DATA.npz CFG.json OUT_DIR RESUME_DIR RUN_ID THREADS [PAUSE_EPOCH]

DATA.npz holds the arrays of a PreparedData (written by the test, loaded without pickles).
With PAUSE_EPOCH the job sleeps inside that epoch's callback, i.e. after training the epoch but
before its resume state is saved, which gives the test a deterministic moment to kill it.
"""

import json
import sys
import time
from pathlib import Path

import torch
from data_fixtures import load_data_file

from shrinkflow.backends.base import JobContext
from shrinkflow.backends.torch.train import train_model


def main() -> None:
    data_file, cfg_file, out_dir, resume_dir, run_id, threads = sys.argv[1:7]
    pause_epoch = int(sys.argv[7]) if len(sys.argv) > 7 else 0
    torch.set_num_threads(int(threads))
    data = load_data_file(Path(data_file))

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == pause_epoch:
            time.sleep(600)

    cfg = json.loads(Path(cfg_file).read_text())
    train_model(
        cfg, "resnet20", data, JobContext(Path(out_dir), Path(resume_dir), on_epoch, run_id), "cpu"
    )


if __name__ == "__main__":
    main()
