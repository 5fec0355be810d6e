"""Train a model on prepared data: SGD, warm-up + cosine LR, in-memory augmentation, resumable.

One loop (``fit``) serves every stage that trains: the baseline (``train_model``), fine-tuning
a pruned model and gradual pruning, which hook into it through ``step_hook``.

Reproducibility: the weight init, the batch order and the augmentation all come from
``cfg["seed"]`` (the global RNG for init and dropout, one CPU ``torch.Generator`` for batches and
crops), so on CPU two runs with the same params, data and thread count end with bit-identical
weights. A killed run resumes from the state saved after its last completed epoch and still ends
bit-identical to an uninterrupted run, because every source of state (weights, BN statistics,
optimizer momentum, scheduler position, GradScaler, RNGs, a stateful step hook) is saved and
restored.

Data parallelism: in a torchrun worker (``train.distributed.processes`` > 1; see
``distributed.py``) ``train_model`` trains in DistributedDataParallel. Every process draws the
same batch order and augmentation from the seed and takes an interleaved share of each global
batch of ``batch_size`` images (as ``DistributedSampler`` does with a data set), with its loss
weighted by its share, so the averaged gradient is that of the whole batch. BatchNorm statistics
are per process (SyncBatchNorm needs GPUs in torch 2.14: CPU inputs raise). Only rank 0 writes
the resume state and the model; every process resumes from rank 0's state.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from shrinkflow.backends.torch import distributed
from shrinkflow.backends.torch.artifact import load_tensor_file, save_model
from shrinkflow.backends.torch.models import create_model
from shrinkflow.backends.torch.tensors import to_device_tensors
from shrinkflow.data.prepared import PreparedData
from shrinkflow.errors import ShrinkflowError
from shrinkflow.outputs import atomic_file
from shrinkflow.progress import say, track
from shrinkflow.training import TrainResult, batch_bounds, diverged, global_batches, model_spec

STATE_FILE = "state.pt"
# Bumped whenever the resume state's layout or the training procedure changes, so that an old
# state is never resumed by code that would continue it differently.
STATE_FORMAT = "shrinkflow.torch.train-state/2"

StepHook = Callable[[int], None]


@runtime_checkable
class StatefulStepHook(Protocol):
    """A step hook whose state must survive a resume (say, the masks of gradual pruning):
    ``fit`` saves ``state_dict()`` with every resume state and restores it on resume."""

    def __call__(self, step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def train_fingerprint(cfg: dict, model_name: str, data: PreparedData) -> str:
    """Hash of all that decides the trained weights: a resume state is reused only on a match."""
    return fingerprint_of(
        {"seed": cfg["seed"], "train": cfg["train"], "model": model_name, "data": data.fingerprint}
    )


def fingerprint_of(key: dict[str, Any]) -> str:
    """SHA-256 of ``key`` (plain JSON values) and the resume-state format."""
    blob = json.dumps({"format": STATE_FORMAT, **key}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def resumable_run_id(resume_dir: Path, fingerprint: str) -> str | None:
    """The MLflow run id saved with a resume state matching ``fingerprint``, else None."""
    state = _read_state(Path(resume_dir) / STATE_FILE, "cpu")
    if state is None or state.get("fingerprint") != fingerprint:
        return None
    return state.get("run_id")


def steps_per_epoch(cfg: dict, data: PreparedData) -> int:
    """Optimizer steps in one epoch over the training split with ``cfg["train"]["batch_size"]``."""
    return len(batch_bounds(len(data.train), int(cfg["train"]["batch_size"])))


def train_model(
    cfg: dict,
    model_name: str,
    data: PreparedData,
    out_dir: Path,
    resume_dir: Path,
    on_epoch: Callable[[int, dict[str, float]], None],
    run_id: str | None = None,
    device: str = "auto",
) -> TrainResult:
    """Train a fresh ``model_name`` with ``cfg["train"]`` and save its best-on-val epoch.

    The arguments are those of ``fit``; the model is initialised from ``cfg["seed"]``. In a
    torchrun worker it trains data-parallel on the worker's device (``device`` is ignored).
    """
    t = cfg["train"]
    epochs = int(t["epochs"])
    if epochs < 1:
        raise ShrinkflowError(f"train.epochs: {epochs} is not >= 1")
    torch.manual_seed(cfg["seed"])
    model = create_model(
        model_name, data.num_classes, in_channels=data.channels, image_size=data.image_size
    )
    with distributed.process_group():
        if distributed.worker_rank() is not None:
            device = distributed.device_of_worker()
        return fit(
            model,
            cfg,
            data,
            epochs=epochs,
            lr=float(t["lr"]),
            warmup_epochs=int(t["warmup_epochs"]),
            out_dir=out_dir,
            resume_dir=resume_dir,
            fingerprint=train_fingerprint(cfg, model_name, data),
            on_epoch=on_epoch,
            run_id=run_id,
            spec=model_spec(model_name, data),
            device=device,
        )


def fit(
    model: nn.Module,
    cfg: dict,
    data: PreparedData,
    *,
    epochs: int,
    lr: float,
    warmup_epochs: int,
    out_dir: Path,
    resume_dir: Path,
    fingerprint: str,
    on_epoch: Callable[[int, dict[str, float]], None],
    run_id: str | None,
    spec: dict[str, Any],
    step_hook: StepHook | None = None,
    select_from_epoch: int = 1,
    device: str = "auto",
    save: Callable[[nn.Module, Path], None] | None = None,
    lr_key: str = "train.lr",
) -> TrainResult:
    """Train ``model`` for ``epochs`` and save its best-on-val epoch to ``out_dir``.

    Batch size, momentum, Nesterov, weight decay, augmentation, label smoothing, the LR
    schedule's shape and mixed precision come from ``cfg["train"]``; ``lr`` is the peak LR
    reached after ``warmup_epochs``.

    Args:
        out_dir: an existing empty folder (the caller renames it into place) that receives
            the model file, written by ``artifact.save_model(model, spec, out_dir)``; the test
            split is never read here.
        resume_dir: where the per-epoch resume state lives; a state with the same
            ``fingerprint`` is continued, any other one is deleted.
        fingerprint: hash of everything that decides the result (see ``fingerprint_of``).
        on_epoch: called after every epoch (1-based) with train_loss, train_top1, val_loss,
            val_top1, lr (of the epoch's last step) and epoch_seconds.
        run_id: stored with the resume state, so a resumed job continues the same MLflow run.
        step_hook: called with the global step (1-based over the whole run, also across a
            resume) after every optimizer step; a ``StatefulStepHook``'s state is resumed too.
        select_from_epoch: only epochs from this one on compete for best-on-val (gradual
            pruning: the epochs at which the target sparsity is reached); clamped to ``epochs``.
        device: "auto" (CUDA if available, else CPU), "cpu" or "cuda[:n]".
        save: writes the best model into ``out_dir`` instead of ``artifact.save_model`` (a
            model that is not a registry model, such as a QAT graph, has its own format);
            ``model`` holds the best epoch's weights when it returns.
        lr_key: the params key ``lr`` comes from, named by the error that stops a run whose
            loss becomes NaN or infinite (``training.diverged``).

    In a process group (DDP) only rank 0 writes the resume state and the model; the others
    read rank 0's resume state and write nothing.
    """
    started = time.perf_counter()
    if epochs < 1:
        raise ValueError(f"fit: epochs {epochs} is not >= 1")
    select_from_epoch = min(select_from_epoch, epochs)
    dev = resolve_device(device)
    with _deterministic_on_cpu(dev):
        run = _Run.build(model, cfg, data, epochs, lr, warmup_epochs, dev, step_hook, lr_key)
        state_path = Path(resume_dir) / STATE_FILE
        state = _matching_state(state_path, fingerprint, dev, owner=run.rank == 0)
        if run.world > 1:
            distributed.check_same(int(state["epoch"]) if state else 0, "the epoch to resume from")
        start_epoch, best_val_top1, best_epoch, best_model, history = 0, -1.0, 0, None, []
        if state is not None:
            start_epoch = int(state["epoch"])
            if start_epoch < epochs:
                say(f"resuming from epoch {start_epoch + 1}/{epochs}")
            else:
                say(f"all {epochs} epochs already trained (resume state); saving the best one")
            run.restore(state)
            best_val_top1, best_epoch = float(state["best_val_top1"]), int(state["best_epoch"])
            best_model, history = state["best_model"], list(state["history"])
        if run.val_size == 0:
            say("no validation images, so the last epoch is kept instead of the best one")

        for epoch in range(start_epoch + 1, epochs + 1):
            metrics = run.epoch(epoch, f"epoch {epoch}/{epochs}")
            history.append({"epoch": epoch, **metrics})
            # Ties go to the later epoch: equally accurate, but trained longer.
            if epoch >= select_from_epoch and (
                run.val_size == 0 or metrics["val_top1"] >= best_val_top1
            ):
                best_val_top1, best_epoch = metrics["val_top1"], epoch
                best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
            _say_epoch(f"epoch {epoch}/{epochs}", metrics)
            on_epoch(epoch, metrics)
            state = {
                "format": STATE_FORMAT,
                "fingerprint": fingerprint,
                "run_id": run_id,
                "epoch": epoch,
                **run.snapshot(),
                "best_val_top1": best_val_top1,
                "best_epoch": best_epoch,
                "best_model": best_model,
                "history": history,
            }
            if run.rank == 0:
                with atomic_file(state_path) as tmp:
                    torch.save(state, tmp)

    model.load_state_dict(best_model)
    run.check_finite_weights(epochs)
    if run.rank == 0:
        if save is None:
            save_model(model, spec, Path(out_dir))
        else:
            save(model, Path(out_dir))
    return TrainResult(
        epochs=epochs,
        best_epoch=best_epoch,
        best_val_top1=best_val_top1,
        resumed_from_epoch=start_epoch,
        history=history,
        seconds=time.perf_counter() - started,
    )


def fit_in_memory(
    model: nn.Module,
    cfg: dict,
    data: PreparedData,
    *,
    epochs: int,
    lr: float,
    step_hook: StepHook | None = None,
    device: str = "auto",
    lr_key: str = "finetune.lr",
) -> nn.Module:
    """``fit`` without warm-up, resume state, saving or best-epoch selection: ``model`` trains
    in place for ``epochs`` (0: unchanged) and is returned in eval mode on the device, its last
    epoch kept. Meant for the short recoveries between rounds of iterative pruning."""
    dev = resolve_device(device)
    with _deterministic_on_cpu(dev):
        run = _Run.build(model, cfg, data, max(epochs, 1), lr, 0, dev, step_hook, lr_key)
        for epoch in range(1, epochs + 1):
            _say_epoch(f"epoch {epoch}/{epochs}", run.epoch(epoch, f"epoch {epoch}/{epochs}"))
        if epochs:
            run.check_finite_weights(epochs)
    return model.eval()


def _say_epoch(label: str, m: dict[str, float]) -> None:
    say(
        f"{label}: train loss {m['train_loss']:.4f} top1 {m['train_top1']:.4f}, "
        f"val loss {m['val_loss']:.4f} top1 {m['val_top1']:.4f}, lr {m['lr']:.5f}, "
        f"{m['epoch_seconds']:.1f} s"
    )


@dataclass
class _Augment:
    """Random crop of the zero-padded image (``pad`` pixels) and optional horizontal flip."""

    enabled: bool
    hflip: bool
    pad: int
    fill: torch.Tensor  # per channel, the normalized value of the padding

    def __call__(self, x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        x = _random_crop(x, shifts, self.pad, self.fill)
        if self.hflip:
            x = torch.where(flips.view(-1, 1, 1, 1), x.flip(3), x)
        return x


@dataclass
class _Run:
    """Everything a training run reads and mutates, so that it can be saved and restored as one."""

    model: nn.Module
    forward: nn.Module  # what the training steps call: ``model``, or its DDP wrapper
    rank: int
    world: int  # processes training data-parallel (1: this one alone)
    bounds: list[tuple[int, int]]  # (start, stop) of each global batch in an epoch's order
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    device: torch.device
    amp: bool
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    batch_size: int
    augment: _Augment
    loss_fn: nn.Module
    step_hook: StepHook | None
    lr_key: str  # the params key of the peak LR, named when the loss diverges
    peak_lr: float

    @classmethod
    def build(
        cls,
        model: nn.Module,
        cfg: dict,
        data: PreparedData,
        epochs: int,
        lr: float,
        warmup_epochs: int,
        dev: torch.device,
        step_hook: StepHook | None,
        lr_key: str = "train.lr",
    ) -> _Run:
        """The optimizer, schedule, data and RNGs of a run from ``cfg``, with ``model`` moved
        to ``dev`` and the global RNG (dropout) seeded from ``cfg["seed"]``."""
        t = cfg["train"]
        batch_size = int(t["batch_size"])
        if batch_size < 1:
            raise ShrinkflowError(f"train.batch_size: {batch_size} is not >= 1")
        if len(data.train) == 0:
            raise ShrinkflowError(
                "prepared data has no training images "
                "(lower data.val_fraction / data.test_fraction or add images)"
            )
        amp = bool(t["mixed_precision"]) and dev.type == "cuda"
        if t["mixed_precision"] and not amp:
            say("train.mixed_precision: ignored on CPU (float16 autocast needs CUDA)")
        torch.manual_seed(cfg["seed"])
        model.to(dev)
        rank, world = distributed.rank_and_size()
        if batch_size % world:
            raise ShrinkflowError(
                f"train.batch_size: {batch_size} does not divide among {world} processes "
                "(train.distributed.processes)"
            )
        bounds = global_batches(len(data.train), batch_size, world)
        steps = len(bounds)
        optimizer = torch.optim.SGD(
            _param_groups(model, float(t["weight_decay"])),
            lr=lr,
            momentum=float(t["momentum"]),
            nesterov=bool(t["nesterov"]),
        )
        return cls(
            model=model,
            forward=distributed.wrap(model, dev) if world > 1 else model,
            rank=rank,
            world=world,
            bounds=bounds,
            optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(
                optimizer, _lr_factor(t["schedule"], warmup_epochs * steps, epochs * steps)
            ),
            scaler=torch.amp.GradScaler("cuda", enabled=amp),
            # Batch order and augmentation come from a CPU generator whatever the device:
            # the same on CPU and GPU, and its state is one small tensor.
            generator=torch.Generator().manual_seed(cfg["seed"]),
            device=dev,
            amp=amp,
            train=to_device_tensors(data, "train", dev),
            val=to_device_tensors(data, "val", dev),
            batch_size=batch_size,
            augment=_Augment(
                enabled=bool(t["augment"]),
                hflip=bool(t["hflip"]),
                pad=data.image_size // 8,  # the CIFAR 4 pixels at 32x32, scaled with the size
                fill=_black(data.mean, data.std, dev),
            ),
            loss_fn=nn.CrossEntropyLoss(label_smoothing=float(t["label_smoothing"])),
            step_hook=step_hook,
            lr_key=lr_key,
            peak_lr=lr,
        )

    @property
    def val_size(self) -> int:
        return len(self.val[1])

    def epoch(self, epoch: int, description: str) -> dict[str, float]:
        """Train one epoch (1-based) in a fresh random order, then score the val split."""
        epoch_start = time.perf_counter()
        x, y = self.train
        n, dev = len(y), self.device
        # All of the epoch's randomness is drawn up front: one transfer to the device.
        order = torch.randperm(n, generator=self.generator)
        shifts = torch.randint(0, 2 * self.augment.pad + 1, (n, 2), generator=self.generator)
        flips = torch.rand(n, generator=self.generator) < 0.5
        order, shifts, flips = order.to(dev), shifts.to(dev), flips.to(dev)
        self.model.train()
        # Accumulated on the device: no host sync per step.
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), dtype=torch.long, device=dev)
        lr = 0.0
        bounds = self.bounds
        step = (epoch - 1) * len(bounds)  # every epoch has the same number of steps
        # Every step's loss, kept on the device (no host sync per step) and checked once the
        # epoch ends: a NaN or infinite one stops the run, naming its step.
        step_losses = torch.empty(len(bounds), device=dev)
        for i, (start, stop) in enumerate(
            track(bounds, total=len(bounds), description=description)
        ):
            idx = order[start:stop]
            if self.world > 1:
                idx = idx[self.rank :: self.world]  # this process's share of the global batch
            xb, yb = self.augment(x[idx], shifts[idx], flips[idx]), y[idx]
            with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=self.amp):
                logits = self.forward(xb)
                loss = self.loss_fn(logits, yb)
            objective = loss
            if self.world > 1:
                # DDP averages the processes' gradients; weighting each mean loss by its share
                # of the batch makes that the gradient of the whole batch's mean loss.
                objective = loss * (len(yb) * self.world / (stop - start))
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(objective).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            step += 1
            if self.step_hook is not None:
                self.step_hook(step)
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()  # per iteration: warm-up and cosine are smooth within epochs
            step_losses[i] = loss.detach().float()
            loss_sum += loss.detach().float() * len(yb)
            correct += (logits.detach().argmax(1) == yb).sum()
        self._check_finite_losses(epoch, step_losses)
        if self.world > 1:
            loss_sum = distributed.sum_over_processes(loss_sum)
            correct = distributed.sum_over_processes(correct)
        val_loss, val_top1 = evaluate_split(self.model, *self.val, self.batch_size, self.amp)
        if self.val_size and not math.isfinite(val_loss):
            # The last steps' updates broke the weights after their losses were computed.
            raise self._diverged(val_loss, epoch, None, what="validation loss")
        return {
            "train_loss": loss_sum.item() / n,
            "train_top1": correct.item() / n,
            "val_loss": val_loss,
            "val_top1": val_top1,
            "lr": lr,
            "epoch_seconds": time.perf_counter() - epoch_start,
        }

    def _diverged(
        self, value: float, epoch: int, step: int | None, what: str = "loss"
    ) -> ShrinkflowError:
        return diverged(
            value,
            epoch=epoch,
            step=step,
            steps=len(self.bounds),
            lr_key=self.lr_key,
            lr=self.peak_lr,
            mixed_precision=self.amp,
            what=what,
        )

    def _check_finite_losses(self, epoch: int, step_losses: torch.Tensor) -> None:
        """Raise ``training.diverged`` if a step's loss in this epoch was NaN or infinite.

        Decided on the count over all processes, so that every data-parallel process stops at
        the same epoch (one that raised alone would leave the others waiting in a collective).
        """
        bad = ~torch.isfinite(step_losses)
        count = bad.sum()
        if self.world > 1:
            count = distributed.sum_over_processes(count)
        if not int(count):
            return
        if bool(bad.any()):
            first = int(bad.nonzero()[0])
            raise self._diverged(float(step_losses[first]), epoch, first + 1)
        raise self._diverged(math.nan, epoch, None)  # another process saw it first

    def check_finite_weights(self, epoch: int) -> None:
        """Raise ``training.diverged`` if a parameter of the model to keep is NaN or infinite
        (the last step of the last epoch can break them with no validation split to show it)."""
        for p in self.model.parameters():
            broken = p.detach()[~torch.isfinite(p.detach())]
            if broken.numel():
                raise self._diverged(float(broken[0]), epoch, None, what="a weight")

    def snapshot(self) -> dict[str, Any]:
        """The run's state as tensors and plain values (loadable with weights_only=True)."""
        cuda = self.device.type == "cuda"
        hook = self.step_hook
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if cuda else [],
            "hook": hook.state_dict() if isinstance(hook, StatefulStepHook) else {},
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        # RNG states must be CPU byte tensors, wherever map_location put the rest.
        self.generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        if self.device.type == "cuda" and state["cuda_rng"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        if isinstance(self.step_hook, StatefulStepHook):
            self.step_hook.load_state_dict(state["hook"])


@contextmanager
def _deterministic_on_cpu(dev: torch.device) -> Iterator[None]:
    """Deterministic kernels while training on CPU, where they cost nothing; then torch's
    previous setting. CUDA runs keep torch's defaults: deterministic GPU convolutions are slow,
    so a GPU run repeats its init and batch order but not every bit."""
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if dev.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def resolve_device(name: str) -> torch.device:
    """The torch.device for "auto" (CUDA if available, else CPU), "cpu" or "cuda[:n]"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ShrinkflowError(f"device {name!r} is not auto, cpu or cuda[:n]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ShrinkflowError(f"device {name!r}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ShrinkflowError(f"device {name!r} is not auto, cpu or cuda[:n]")
    return dev


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv and linear weights only, not on BN scales/shifts nor biases.

    Decaying BN parameters and biases only shrinks scales the next layer undoes and costs
    accuracy (as in the usual ImageNet/CIFAR recipes). Conv and linear weights are exactly the
    parameters with two or more dimensions.
    """
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _lr_factor(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier per iteration: linear from 1/10 to 1 over the warm-up, then cosine or flat.

    The cosine reaches 0 at ``total_steps``, i.e. just after the last iteration.
    """
    if schedule not in ("cosine", "constant"):
        raise ShrinkflowError(f"train.schedule: {schedule!r} is not cosine or constant")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return 0.1 + 0.9 * step / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _black(mean: Any, std: Any, dev: torch.device) -> torch.Tensor:
    """The normalized value of a black pixel: padding is black before normalization, as in
    torchvision's RandomCrop(padding=4) followed by Normalize."""
    m = torch.tensor(mean, dtype=torch.float32, device=dev)
    s = torch.tensor(std, dtype=torch.float32, device=dev)
    return (-m / s).view(1, -1, 1, 1)


def _random_crop(
    x: torch.Tensor, shifts: torch.Tensor, pad: int, fill: torch.Tensor
) -> torch.Tensor:
    """Per-image random crop of the ``pad``-padded batch back to its size, by two gathers."""
    if pad == 0:
        return x
    b, c, h, w = x.shape
    padded = fill.expand(b, c, h + 2 * pad, w + 2 * pad).clone()
    padded[:, :, pad : pad + h, pad : pad + w] = x
    rows = shifts[:, 0:1] + torch.arange(h, device=x.device)  # (B, H) rows to keep
    cols = shifts[:, 1:2] + torch.arange(w, device=x.device)  # (B, W) columns to keep
    out = padded.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2 * pad))
    return out.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


@torch.no_grad()
def evaluate_split(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, amp: bool
) -> tuple[float, float]:
    """Mean cross-entropy and top-1 over a split in eval mode; NaN for an empty split.

    The loss is plain cross-entropy whatever train.label_smoothing, so that validation losses
    compare between settings.
    """
    if len(y) == 0:
        return math.nan, math.nan
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        with torch.autocast(device_type=x.device.type, dtype=torch.float16, enabled=amp):
            logits = model(xb)
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    return loss_sum.item() / len(y), correct.item() / len(y)


def _matching_state(
    path: Path, fingerprint: str, dev: torch.device, owner: bool = True
) -> dict | None:
    """The resume state at ``path`` if it was saved for ``fingerprint``; the ``owner`` (rank 0)
    deletes any other."""
    state = _read_state(path, dev)
    if state is not None and state.get("fingerprint") != fingerprint:
        if owner:
            say(f"{path}: saved for other params, data or model; starting over")
        state = None
    if state is None and owner:
        path.unlink(missing_ok=True)  # a stale state must not be resumed by a later run either
    return state


def _read_state(path: Path, dev: torch.device | str) -> dict | None:
    """The resume state at ``path``, or None when there is none or it cannot be read.

    The state is a cache: an unreadable one (say, from an older torch) is reported and
    ignored rather than failing the job.
    """
    if not path.is_file():
        return None
    try:
        # The weights-only unpickler: a planted state must not run code (it is refused).
        state = load_tensor_file(path, dev, "resume state")
    except ShrinkflowError as e:
        say(f"{e}; ignored, starting over")
        return None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        say(f"{path}: resume state of another format ignored")
        return None
    return state
