"""TensorFlow QAT of a pruned model: do the zeros survive into the int8 ``.tflite``?

Run from the project root inside the virtualenv:

    python benchmarks/tf_qat_sparsity.py [--sparsity 0.7] [--lr 0.001 0.01]

On scikit-learn's 8x8 digits (the tests' split: 1257 train, 180 val, 360 test images) with
params.yaml's train, finetune and quantize settings: a ResNet-20 baseline is trained, pruned
one-shot (``l1_unstructured``, params.yaml's scope and exclude) and fine-tuned with its zeros
held, then quantized to an int8 ``.tflite`` by post-training ``static_int8`` and by
``qat_int8`` under tfmot's plain 8-bit scheme and under its prune-preserving scheme (the one
the DAG uses for a source with zeros), at each ``--lr`` (params.yaml's ``quantize.qat.lr`` is
0.001). Sparsity is the zero share of every conv and dense kernel: of the float source, and of
the int8 weights as the ``.tflite`` file stores them (``measured_sparsity``, what
``shrinkflow evaluate`` reports). Top-1 is the file's, run by the TFLite interpreter.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2
# Python puts this script's folder first on the path, where benchmarks/tensorflow.py would
# shadow the tensorflow package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from shrinkflow.backends.base import JobContext  # noqa: E402
from shrinkflow.backends.tensorflow import qat, tflite  # noqa: E402
from shrinkflow.backends.tensorflow.artifact import TFLITE_FILE, load_model  # noqa: E402
from shrinkflow.backends.tensorflow.evaluate import logits  # noqa: E402
from shrinkflow.backends.tensorflow.finetune import finetune_model  # noqa: E402
from shrinkflow.backends.tensorflow.prune import prune_model  # noqa: E402
from shrinkflow.backends.tensorflow.quantize import quantize_model  # noqa: E402
from shrinkflow.backends.tensorflow.train import train_model  # noqa: E402
from shrinkflow.backends.tensorflow.trainer import evaluate_split  # noqa: E402
from shrinkflow.config import load_params  # noqa: E402
from shrinkflow.data.prepared import PreparedData  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def digits() -> PreparedData:
    """The tests' 8x8 digits split (tests/data_fixtures.py ``digits_data``)."""
    raw = load_digits()
    images = np.round(raw.images * (255 / 16)).astype(np.uint8)[..., None]
    order = np.random.default_rng(0).permutation(len(images))
    pixels = images[order[540:]] / 255.0
    return PreparedData(
        images=images,
        labels=raw.target.astype(np.int64),
        train=order[540:],
        val=order[360:540],
        test=order[:360],
        classes=[str(c) for c in range(10)],
        mean=(float(pixels.mean()),),
        std=(float(pixels.std()),),
        manifest={"fingerprint": "digits-8x8-benchmark"},
    )


def file_sparsity(folder: Path) -> float:
    """The zero share of the int8 conv/dense weights stored in ``folder``'s ``.tflite``."""
    layers = tflite.weight_layers(folder / TFLITE_FILE)
    return float(tflite.count_params(layers)["measured_sparsity"])


def top1(path: Path, data: PreparedData, split: str) -> float:
    runner = tflite.Runner(path, 64, tflite.default_threads())
    index = getattr(data, split)
    return float(np.mean(logits(runner, data.images[index]).argmax(1) == data.labels[index]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--lr", type=float, nargs="+", default=[0.001, 0.01])
    args = parser.parse_args()
    cfg = load_params([ROOT / "params.yaml"])
    data = digits()
    scratch = Path(tempfile.mkdtemp(prefix="shrinkflow-qat-bench-"))

    def folder(name: str) -> JobContext:
        (scratch / name).mkdir()
        return JobContext(scratch / name, scratch / f"{name}-resume")

    started = time.perf_counter()
    train_model(cfg, "resnet20", data, folder("baseline"))
    prune_model(cfg, "l1_unstructured", args.sparsity, scratch / "baseline", data, folder("pruned"))
    finetune_model(cfg, scratch / "pruned", data, folder("finetuned"))
    source = scratch / "finetuned"
    rows = []
    quantize_model(cfg, "static_int8", source, data, folder("static_int8"))
    rows.append(
        ("static_int8", "-", "-", file_sparsity(scratch / "static_int8"), scratch / "static_int8")
    )
    for lr in args.lr:
        run_cfg = {
            **cfg,
            "quantize": {**cfg["quantize"], "qat": {**cfg["quantize"]["qat"], "lr": lr}},
        }
        for preserve in (False, True):
            name = f"qat-{lr}-{preserve}"
            facts = qat.qat_int8(run_cfg, source, data, folder(name), preserve_zeros=preserve)
            rows.append(
                ("qat_int8", qat.SCHEMES[preserve], lr, facts["measured_sparsity"], scratch / name)
            )
    source_sparsity = facts["source_sparsity"]
    model, _ = load_model(source)
    val, test = (evaluate_split(model, data, split, 64)[1] for split in ("val", "test"))
    print(
        f"\nresnet20, digits 8x8, l1_unstructured {args.sparsity} (scope {cfg['prune']['scope']}, "
        f"exclude {cfg['prune']['exclude']}), fine-tuned {cfg['finetune']['epochs']} epochs; "
        f"QAT {cfg['quantize']['qat']['epochs']} epoch(s)"
    )
    print(
        f"float source (.keras): conv/dense kernel sparsity {source_sparsity:.4f}, "
        f"val top1 {val:.4f}, test top1 {test:.4f}"
    )
    print(
        f"{'method':<12} {'scheme':<20} {'qat lr':>7} {'int8 sparsity':>14} "
        f"{'val top1':>9} {'test top1':>9}"
    )
    for method, scheme, lr, sparsity, out in rows:
        path = out / TFLITE_FILE
        print(
            f"{method:<12} {scheme:<20} {lr!s:>7} {sparsity:>14.4f} "
            f"{top1(path, data, 'val'):>9.4f} {top1(path, data, 'test'):>9.4f}"
        )
    print(f"({time.perf_counter() - started:.0f} s; files in {scratch})")


if __name__ == "__main__":
    main()
