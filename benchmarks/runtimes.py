"""Like with like: a TFLite int8 ResNet-20 against TFLite float32 and against Keras, at batch 1.

Run from the project root inside the virtualenv:

    python benchmarks/runtimes.py [--image-size 32] [--epochs 3] [--repeats 200] [--threads 2]

Builds a ResNet-20 for scikit-learn's digits (resized to ``--image-size``, 1 channel, as the
default pipeline prepares them), trains it for ``--epochs`` epochs (timing does not depend on
the weights' values: every kernel is dense; the epochs only make the int8 calibration ranges
those of a trained model), saves it as a Keras node and quantizes it by the pipeline's own
``static_int8`` method. Then ``shrinkflow evaluate``'s code measures the int8 file with the
Keras model as its reference, which times three models side by side, call by call, at batch 1:
the int8 file, the Keras model, and the Keras model converted to TFLite float32. It prints the
three medians and the ratios evaluate reports: ``speedup_b1`` (int8 over TFLite float32, the
same runtime: what int8 buys) and ``latency_speedup`` (int8 over Keras, cross-runtime: int8
plus what TFLite saves per call over a Keras graph), and the TFLite-float32-over-Keras ratio
that separates the two. Under 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2
from figures import recorded  # this script's folder, before it leaves the path

# Python puts this script's folder first on the path, where benchmarks/tensorflow.py would
# shadow the tensorflow package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from shrinkflow.backends.base import JobContext  # noqa: E402
from shrinkflow.backends.tensorflow import evaluate  # noqa: E402
from shrinkflow.backends.tensorflow.artifact import save_model  # noqa: E402
from shrinkflow.backends.tensorflow.models import create_model  # noqa: E402
from shrinkflow.backends.tensorflow.quantize import quantize_model  # noqa: E402
from shrinkflow.data.imagefolder import resize  # noqa: E402
from shrinkflow.data.prepared import PreparedData  # noqa: E402
from shrinkflow.training import model_spec  # noqa: E402

SEED = 0
TEST, VAL = 360, 180  # held-out images of the 1797 digits; the rest train and calibrate
CALIBRATION_BATCHES = 8  # of 32 images: params.yaml's quantize.calibration_batches order


def digits(size: int) -> PreparedData:
    """scikit-learn's digits as 0..255 pixels, bilinear-resized to ``size`` as the pipeline's
    ``prepare`` does, split at random (``SEED``) into test, val and train."""
    raw = load_digits()
    small = np.round(raw.images * (255 / 16)).astype(np.uint8)
    images = np.stack([resize(Image.fromarray(image), size) for image in small])
    order = np.random.default_rng(SEED).permutation(len(images))
    train = order[TEST + VAL :]
    pixels = images[train] / 255.0
    return PreparedData(
        images=images,
        labels=raw.target.astype(np.int64),
        train=train,
        val=order[TEST : TEST + VAL],
        test=order[:TEST],
        classes=[str(c) for c in range(10)],
        mean=(float(pixels.mean()),),
        std=(float(pixels.std()),),
        manifest={"fingerprint": f"digits-{size}-benchmark"},
    )


def baseline(data: PreparedData, epochs: int, folder: Path) -> Path:
    """A ResNet-20 trained ``epochs`` epochs on ``data`` (plain SGD), saved in ``folder``."""
    keras.utils.set_random_seed(SEED)
    model = create_model("resnet20", 10, 1, data.image_size, data.mean, data.std)
    if epochs:
        model.compile(
            keras.optimizers.SGD(0.05, momentum=0.9),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        images = data.images[data.train].astype(np.float32)
        model.fit(images, data.labels[data.train], 32, epochs, verbose=0)
    folder.mkdir()
    save_model(model, model_spec("resnet20", data), folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=32, help="params.yaml: 32")
    parser.add_argument("--epochs", type=int, default=3, help="training before quantizing")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls per model")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per model")
    parser.add_argument(
        "--threads", type=int, default=0, help="TensorFlow's and TFLite's threads (0: every CPU)"
    )
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    cfg = {
        "seed": SEED,
        "train": {"batch_size": 32},
        "quantize": {"calibration_batches": CALIBRATION_BATCHES},
        # batch 1 only: latency is what is compared; throughput is then at batch 1 too
        "evaluate": {
            "device": "cpu",
            "batch_sizes": [1],
            "warmup": args.warmup,
            "repeats": args.repeats,
        },
    }
    data = digits(args.image_size)
    with tempfile.TemporaryDirectory(prefix="shrinkflow-runtimes-") as scratch:
        root = Path(scratch)
        source = baseline(data, args.epochs, root / "float")
        int8 = root / "static_int8"
        int8.mkdir()
        quantize_model(cfg, "static_int8", source, data, JobContext(int8, root / "resume"))
        result = evaluate.evaluate_model(cfg, int8, data, reference_dir=source)

    int8_ms, float_ms = result["latency_ms_b1"], result["float_latency_ms_b1"]
    keras_ms = result["reference_latency_ms_b1"]
    print(
        f"ResNet-20, digits {args.image_size}x{args.image_size}x1, batch 1, "
        f"{result['threads']} threads, median of {args.repeats} calls each, taking turns "
        f"(int8 top-1 {result['top1']:.3f})"
    )
    print(f"  TFLite int8     {int8_ms:8.3f} ms")
    print(f"  TFLite float32  {float_ms:8.3f} ms")
    print(f"  Keras float32   {keras_ms:8.3f} ms")
    print(
        f"  speedup_b1      {result['speedup_b1']:6.2f}x  int8 over TFLite float32 (same runtime)"
    )
    print(f"  latency_speedup {result['latency_speedup']:6.2f}x  int8 over Keras (cross-runtime)")
    print(f"  runtime alone   {keras_ms / float_ms:6.2f}x  TFLite float32 over Keras")


if __name__ == "__main__":
    with recorded("runtimes"):
        main()
