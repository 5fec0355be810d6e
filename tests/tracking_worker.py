"""A pipeline job stand-in for test_tracking.py, run as a separate OS process.

    python tracking_worker.py URI INDEX STEPS GO_FILE        log STEPS x 3 metrics, then exit
    python tracking_worker.py URI INDEX sleep READY_FILE     start a run, write its id, then sleep

Each worker imports mlflow and its SQL store, writes ready-INDEX beside GO_FILE and waits for
GO_FILE, so all of them reach the (fresh) store at once instead of staggered by import times.
"""

import sys
import time
from pathlib import Path

import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (up front: see the docstring)

from shrinkflow.tracking import job_run

METRICS = ("loss", "acc", "lr")


def _wait_for(path: Path, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not path.exists():
        if time.monotonic() > deadline:
            sys.exit(f"worker: {path} never appeared")
        time.sleep(0.01)


def main() -> None:
    uri, index, mode, signal_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    cfg = {
        "seed": index,
        "data": {"name": "digits", "image_size": 32},
        "tracking": {"experiment": "concurrency", "uri": uri},
    }
    if mode == "sleep":
        with job_run(cfg, "sleeper") as job:
            signal_file.write_text(job.run_id)
            time.sleep(60)
        return
    (signal_file.parent / f"ready-{index}").touch()
    _wait_for(signal_file)
    with job_run(cfg, "worker", tags={"worker": str(index)}) as job:
        for step in range(int(mode)):
            for n, key in enumerate(METRICS):  # one write per metric, to stress the store
                job.log_metrics({key: index + step / 100 + n}, step=step)
        artifact = signal_file.parent / f"worker-{index}.txt"
        artifact.write_text(f"worker {index}\n")
        job.log_artifact(artifact)


if __name__ == "__main__":
    main()
