"""Does knowledge distillation from the baseline help fine-tuning recover a pruned model?

Run from the project root inside the virtualenv:

    python benchmarks/distill.py [--seeds 0 1 2] [--alpha 0.7] [--temperature 4] [--threads 1]

In-process on the torch backend (the pipeline's own job functions, no DAG), for two data sets:
the 8x8 digits (the test suite's size) and ``shapes`` (benchmarks/shapes.py: 10 classes of
noisy 12x12 shapes and fills, generated from seed 0, which ResNet-20 does not solve). Per data
set and training seed: train a ResNet-20 baseline (params.yaml's recipe for the set's
``EPOCHS``), prune it to 70 % and 90 % (l1_unstructured) and to 50 % of filters
(structured_l1, one round), then fine-tune each point twice for the same epochs at the same LR:
without distillation and with ``finetune.distill`` = {alpha, temperature}, the baseline as
teacher.
Both runs keep their best-on-validation epoch, as the pipeline does.

Printed per point: mean validation and test top-1 over the seeds with and without distillation,
each with its 95 % Student-t interval, and the paired difference (distilled minus plain, paired
by seed) with its interval. Nothing is asserted; the table goes into docs/figures.md.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from figures import recorded
from shapes import shapes_data
from workspace import ROOT

from shrinkflow.backends.base import JobContext
from shrinkflow.backends.torch.artifact import load_model
from shrinkflow.backends.torch.finetune import finetune_model
from shrinkflow.backends.torch.prune import prune_model
from shrinkflow.backends.torch.tensors import to_device_tensors
from shrinkflow.backends.torch.train import train_model
from shrinkflow.backends.torch.trainer import evaluate_split
from shrinkflow.config import merge, read_yaml
from shrinkflow.data.prepared import PreparedData
from shrinkflow.report.noise import Interval, student_t

POINTS = [("l1_unstructured", 0.7), ("l1_unstructured", 0.9), ("structured_l1", 0.5)]
# Per data set: (baseline epochs, fine-tuning epochs). Digits is learnt in a few epochs; shapes
# needs more to give the teacher something to teach. One thread: on 2 shared cores a second
# thread makes torch's kernels spin (measured: 30-50 s an epoch with 2, under 1 s with 1).
EPOCHS = {"digits 8x8": (8, 2), "shapes 12x12": (20, 3)}


def digits_8x8() -> PreparedData:
    """scikit-learn's digits at their own 8x8, split 60/20/20 by a fixed permutation."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    order = np.random.default_rng(0).permutation(len(images))
    train, val, test = np.split(order, [int(0.6 * len(order)), int(0.8 * len(order))])
    pixels = images[train] / 255.0
    return PreparedData(
        images=images,
        labels=digits.target.astype(np.int64),
        train=train,
        val=val,
        test=test,
        classes=[str(c) for c in range(10)],
        mean=(float(pixels.mean()),),
        std=(float(pixels.std()),),
        manifest={"fingerprint": "digits-8x8-benchmark"},
    )


def top1(folder: Path, data: PreparedData, split: str) -> float:
    model, _ = load_model(folder)
    x, y = to_device_tensors(data, split, "cpu")
    return evaluate_split(model, x, y, 256, False)[1]


def run_seed(cfg: dict, data: PreparedData, seed: int, distill: dict, work: Path) -> dict:
    """One seed: baseline, three pruned points, each fine-tuned plain and distilled. Returns
    {(point, variant): (val top-1, test top-1)} with variant baseline/pruned/plain/distilled."""
    seeded = {**cfg, "seed": seed}
    root = work / f"seed{seed}"

    def job(name: str) -> JobContext:
        for folder in (root / name, root / f"{name}-resume"):
            folder.mkdir(parents=True)
        return JobContext(root / name, root / f"{name}-resume")

    train_model(seeded, "resnet20", data, job("baseline"), device="cpu")
    scores = {("baseline", "baseline"): (top1(root / "baseline", data, "val"),
                                         top1(root / "baseline", data, "test"))}  # fmt: skip
    for method, sparsity in POINTS:
        point = f"{method} {sparsity:g}"
        tag = f"{method}-{sparsity:g}"
        prune_model(seeded, method, sparsity, root / "baseline", data, job(f"{tag}-pruned"))
        pruned = root / f"{tag}-pruned"
        scores[(point, "pruned")] = (top1(pruned, data, "val"), top1(pruned, data, "test"))
        for variant, settings in (("plain", None), ("distilled", distill)):
            tuned_cfg = copy.deepcopy(seeded)
            tuned_cfg["finetune"]["distill"] = settings
            name = f"{tag}-{variant}"
            teacher = root / "baseline" if settings else None
            finetune_model(tuned_cfg, pruned, data, job(name), teacher)
            scores[(point, variant)] = (top1(root / name, data, "val"),
                                        top1(root / name, data, "test"))  # fmt: skip
    return scores


def pt(interval: Interval) -> str:
    half = (interval.high - interval.low) / 2 * 100
    return f"{interval.mean * 100:.1f} ± {half:.1f}"


def signed(interval: Interval) -> str:
    half = (interval.high - interval.low) / 2 * 100
    return f"{interval.mean * 100:+.1f} ± {half:.1f}"


def table(name: str, runs: list[dict], split: int) -> None:
    """Markdown rows for one data set and split (0: val, 1: test)."""
    base = student_t([r[("baseline", "baseline")][split] for r in runs])
    print(f"\n**{name}, {('validation', 'test')[split]} top-1 (%)**; baseline {pt(base)}\n")
    print("| point | after pruning | fine-tuned | fine-tuned + distillation | distilled − plain |")
    print("|---|---|---|---|---|")
    for method, sparsity in POINTS:
        point = f"{method} {sparsity:g}"
        values = {v: [r[(point, v)][split] for r in runs] for v in ("pruned", "plain", "distilled")}
        paired = [d - p for d, p in zip(values["distilled"], values["plain"], strict=True)]
        diff = student_t(paired)
        verdict = "" if diff.contains_zero() else " (outside noise)"
        print(
            f"| {point} | {pt(student_t(values['pruned']))} | {pt(student_t(values['plain']))} "
            f"| {pt(student_t(values['distilled']))} | {signed(diff)}{verdict} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = merge(
        read_yaml(ROOT / "params.yaml"),
        {
            "train": {"batch_size": 64},
            # one round, no fine-tuning inside the prune stage: both variants start from the
            # same pruned model and fine-tune for the same epochs
            "prune": {"structured": {"rounds": 1, "round_epochs": 0}},
        },
    )
    distill = {"alpha": args.alpha, "temperature": args.temperature}
    sets = {"digits 8x8": digits_8x8(), "shapes 12x12": shapes_data(0)}
    with recorded("distill"):
        t = cfg["train"]
        print(
            f"ResNet-20 (torch, CPU, {args.threads} thread(s)); seeds {args.seeds}; baseline "
            f"at lr {t['lr']} (batch {t['batch_size']}, augment {t['augment']}); every point "
            f"fine-tuned at lr {cfg['finetune']['lr']}, plain and with distill alpha "
            f"{args.alpha}, temperature {args.temperature:g}, for the same epochs; mean over "
            "seeds ± 95 % Student-t half-width; difference paired by seed."
        )
        started = time.perf_counter()
        for name, data in sets.items():
            epochs, finetune_epochs = EPOCHS[name]
            print(
                f"\n{name}: {len(data.train)} train / {len(data.val)} val / "
                f"{len(data.test)} test images; baseline {epochs} epochs, fine-tuning "
                f"{finetune_epochs}"
            )
            set_cfg = merge(
                cfg, {"train": {"epochs": epochs}, "finetune": {"epochs": finetune_epochs}}
            )
            with tempfile.TemporaryDirectory() as work:
                runs = [run_seed(set_cfg, data, s, distill, Path(work)) for s in args.seeds]
            for split in (0, 1):
                table(name, runs, split)
        print(f"\n{time.perf_counter() - started:.0f} s in all.")


if __name__ == "__main__":
    main()
