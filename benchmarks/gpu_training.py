"""Training throughput on a CUDA GPU: shrinkflow's loop with its fast path off and on, against a
plain DataLoader loop, side by side in one run.

Run from the project root inside the virtualenv:

    python benchmarks/gpu_training.py [--models resnet20 resnet56] [--batch-sizes 128 512]
    python benchmarks/gpu_training.py --smoke      # tiny counts: checks it runs (CPU is fine)

Per model and batch size, on ``--images`` synthetic 32x32x3 images (timing does not depend on
pixel values; the count leaves one smaller batch per epoch, as CIFAR's 45,000 do), every variant
trains ``--epochs`` epochs from the same initial weights and the median epoch after the first
(warm-up: cuDNN's first calls, the CUDA graph's capture) gives images/s:

- plain: ``DataLoader(TensorDataset(normalized images), shuffle=True, pin_memory=True,
  num_workers=--workers)``, batches copied with ``non_blocking``, SGD (momentum, Nesterov, weight
  decay; torch's default foreach kernels), ``loss.item()`` every step as a training log reads it;
  no augmentation; float32, and bfloat16 autocast;
- shrinkflow: ``trainer.Trainer.train_epoch`` with params.yaml's recipe (random crop and flip on
  the device, label smoothing off, the per-step LR schedule), the data on the device, no
  validation split; ``train.precision`` x ``train.compile`` as named.

Printed: images/s per variant and its ratio to the plain float32 loop. Variants a device cannot
run (anything but float32 on a CPU, bfloat16 before compute capability 8.0) are skipped with a
line saying so. Nothing is asserted; the table goes into docs/figures.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from figures import recorded
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from workspace import ROOT

from shrinkflow.backends.torch.device import AUTOCAST, autocast
from shrinkflow.backends.torch.models import create_model
from shrinkflow.backends.torch.tensors import normalize
from shrinkflow.backends.torch.trainer import Trainer
from shrinkflow.config import read_yaml
from shrinkflow.data.prepared import PreparedData
from shrinkflow.training import TrainPlan

SEED = 0
CLASSES = 10
# (label, loop, train.precision, train.compile); the first is what the ratios divide by.
VARIANTS = [
    ("plain DataLoader loop, float32", "plain", "float32", False),
    ("plain DataLoader loop, bfloat16 autocast", "plain", "bfloat16", False),
    ("shrinkflow, fast path off (float32, eager)", "shrinkflow", "float32", False),
    ("shrinkflow, bfloat16, eager", "shrinkflow", "bfloat16", False),
    ("shrinkflow, float32, CUDA graph", "shrinkflow", "float32", True),
    ("shrinkflow, bfloat16, CUDA graph (auto on Ampere+)", "shrinkflow", "bfloat16", True),
]


def synthetic(images: int, size: int) -> PreparedData:
    """``images`` random 32x32x3 uint8 images with random labels, all in the train split."""
    rng = np.random.default_rng(SEED)
    return PreparedData(
        images=rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8),
        labels=rng.integers(0, CLASSES, images).astype(np.int64),
        train=np.arange(images),
        val=np.arange(0),
        test=np.arange(0),
        classes=[str(c) for c in range(CLASSES)],
        mean=(0.5, 0.5, 0.5),
        std=(0.29, 0.29, 0.29),
        manifest={"fingerprint": "synthetic-benchmark"},
    )


def fresh_model(name: str, data: PreparedData) -> nn.Module:
    torch.manual_seed(SEED)
    return create_model(name, CLASSES, data.channels, data.image_size)


def plain_epochs(
    name: str, data: PreparedData, t: dict, precision: str, dev: torch.device, workers: int
) -> Callable[[int], None]:
    """One epoch of the plain loop per call."""
    model = fresh_model(name, data).to(dev)
    x = normalize(data.images[data.train], data.mean, data.std)
    y = torch.from_numpy(data.labels[data.train])
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=int(t["batch_size"]),
        shuffle=True,
        num_workers=workers,
        pin_memory=dev.type == "cuda",
        persistent_workers=workers > 0,
    )
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=float(t["lr"]),
        momentum=float(t["momentum"]),
        nesterov=bool(t["nesterov"]),
        weight_decay=float(t["weight_decay"]),
    )
    loss_fn = nn.CrossEntropyLoss()
    dtype = AUTOCAST[precision]

    def epoch(_: int) -> None:
        model.train()
        running = 0.0
        for xb, yb in loader:
            xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            with autocast(dtype, dev):
                loss = loss_fn(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item()

    return epoch


def shrinkflow_epochs(
    name: str, data: PreparedData, t: dict, precision: str, compile_: bool, dev: torch.device
) -> Callable[[int], None]:
    """One epoch of ``Trainer.train_epoch`` per call."""
    cfg = {"seed": SEED, "train": {**t, "precision": precision, "compile": compile_}}
    plan = TrainPlan(int(t["epochs"]), float(t["lr"]), 0, "train.lr")
    run = Trainer.build(fresh_model(name, data), cfg, data, plan, dev)
    return lambda epoch: run.train_epoch(epoch, f"epoch {epoch}")


def images_per_second(epoch: Callable[[int], None], epochs: int, images: int, dev) -> float:
    """``images`` over the median time of epochs 2..``epochs`` (the first warms up)."""
    seconds = []
    for e in range(1, epochs + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        epoch(e)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds.append(time.perf_counter() - start)
    return images / statistics.median(seconds[1:])


def runnable(precision: str, compile_: bool, dev: torch.device) -> str | None:
    """Why a variant cannot run on ``dev`` (None: it can)."""
    if dev.type != "cuda" and (precision != "float32" or compile_):
        return "needs CUDA"
    if precision == "bfloat16" and torch.cuda.get_device_capability(dev) < (8, 0):
        return "needs compute capability 8.0+"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20"], help="also resnet56 ...")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--images", type=int, default=12000, help="per epoch")
    parser.add_argument("--epochs", type=int, default=4, help="the first is a warm-up")
    parser.add_argument("--workers", type=int, default=4, help="the plain loop's DataLoader")
    parser.add_argument("--threads", type=int, default=0, help="torch's CPU threads (0: all)")
    parser.add_argument("--smoke", action="store_true", help="256 images, batch 64, 2 epochs")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.batch_sizes, args.epochs, args.workers = 256, [64], 2, 0
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    recipe = read_yaml(ROOT / "params.yaml")["train"]
    data = synthetic(args.images, 32)
    print(
        f"{where}, torch {torch.__version__}: {args.images} synthetic 32x32x3 images per epoch, "
        f"images/s of the median of {args.epochs - 1} epoch(s) after a warm-up epoch"
    )
    for name in args.models:
        for batch in args.batch_sizes:
            t = {**recipe, "batch_size": batch, "epochs": args.epochs, "hflip": True}
            t["label_smoothing"] = 0.0
            print(f"{name}, batch {batch}:")
            reference = None
            for label, loop, precision, compile_ in VARIANTS:
                if why := runnable(precision, compile_, dev):
                    print(f"  {label:<50} skipped: {why}")
                    continue
                if loop == "plain":
                    epoch = plain_epochs(name, data, t, precision, dev, args.workers)
                else:
                    epoch = shrinkflow_epochs(name, data, t, precision, compile_, dev)
                rate = images_per_second(epoch, args.epochs, args.images, dev)
                reference = reference or rate
                print(f"  {label:<50} {rate:9,.0f} img/s  {rate / reference:5.2f}x")


if __name__ == "__main__":
    with recorded("gpu-training"):
        main()
