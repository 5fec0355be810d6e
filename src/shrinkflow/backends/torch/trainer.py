"""The torch side of the training loop: ``Trainer``, the ``training.loop.EpochRun`` of a torch
run (one epoch of training, the validation score, best weights, the resume state), and
``evaluate_split``.

Everything a run reads and mutates is held in the ``Trainer``, so that it is saved and
restored as one (``snapshot``/``restore``): weights, BN statistics, optimizer momentum,
scheduler position, GradScaler, RNGs and a stateful step hook.

On CUDA the step takes the fast path that ``train.precision`` and ``train.compile`` ask for
(``device.fast_path``): autocast to bfloat16 (float16 with a GradScaler), channels-last
activations, and full batches replayed as one CUDA graph (``cuda_graph.GraphStep``). On CPU
the step is float32 and eager, exactly as before those keys existed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from shrinkflow.backends.torch import distributed
from shrinkflow.backends.torch.augment import Augment
from shrinkflow.backends.torch.cuda_graph import GraphStep
from shrinkflow.backends.torch.device import AUTOCAST, autocast, fast_path
from shrinkflow.backends.torch.distill import Teacher
from shrinkflow.backends.torch.optim import lr_scheduler, sgd
from shrinkflow.backends.torch.resume_state import STATE_FORMAT, StateFile
from shrinkflow.backends.torch.tensors import to_device_tensors
from shrinkflow.data.prepared import PreparedData
from shrinkflow.errors import ShrinkflowError
from shrinkflow.progress import track
from shrinkflow.training import TrainPlan, diverged, train_batches
from shrinkflow.training.resume import matching_state

StepHook = Callable[[int], None]


@runtime_checkable
class StatefulStepHook(Protocol):
    """A step hook whose state must survive a resume (say, the masks of gradual pruning):
    ``fit`` saves ``state_dict()`` with every resume state and restores it on resume."""

    def __call__(self, step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Trainer:
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
    amp_dtype: torch.dtype | None  # the autocast dtype of the steps; None: float32
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    batch_size: int
    augment: Augment
    loss_fn: nn.Module
    step_hook: StepHook | None
    diverged: Callable[..., ShrinkflowError]  # ``training.diverged`` for this run
    teacher: Teacher | None = None  # a distilled run's teacher (stateless: nothing to resume)
    # ``fit`` only (a run in memory keeps no state and saves nothing):
    resume_dir: Path | None = None
    save: Callable[[nn.Module], None] | None = None  # writes the model to keep
    best_model: dict[str, torch.Tensor] | None = None  # the best epoch's weights
    graph: GraphStep | None = None  # train.compile on CUDA: full batches replay this graph
    state_format: ClassVar[str] = STATE_FORMAT

    @classmethod
    def build(
        cls,
        model: nn.Module,
        cfg: dict,
        data: PreparedData,
        plan: TrainPlan,
        dev: torch.device,
        step_hook: StepHook | None = None,
        resume_dir: Path | None = None,
        save: Callable[[nn.Module], None] | None = None,
        teacher: Teacher | None = None,
    ) -> Trainer:
        """The optimizer, schedule, data and RNGs of a run of ``plan`` from ``cfg``, with
        ``model`` (and a distilled run's ``teacher``) moved to ``dev`` and the global RNG
        (dropout) seeded from ``cfg["seed"]``."""
        t = cfg["train"]
        batch_size = int(t["batch_size"])
        rank, world = distributed.rank_and_size()
        bounds = train_batches(batch_size, len(data.train), world)
        path = fast_path(t, dev, world)
        float16 = path.precision == "float16"
        torch.manual_seed(cfg["seed"])
        model.to(dev)
        steps = len(bounds)
        optimizer = sgd(model, t, plan.lr, fused=path.compile)
        warmup_steps, total_steps = plan.warmup_epochs * steps, plan.epochs * steps
        trainer = cls(
            model=model,
            forward=distributed.wrap(model, dev) if world > 1 else model,
            rank=rank,
            world=world,
            bounds=bounds,
            optimizer=optimizer,
            scheduler=lr_scheduler(optimizer, t["schedule"], warmup_steps, total_steps),
            scaler=torch.amp.GradScaler("cuda", enabled=float16),
            # Batch order and augmentation come from a CPU generator whatever the device:
            # the same on CPU and GPU, and its state is one small tensor.
            generator=torch.Generator().manual_seed(cfg["seed"]),
            device=dev,
            amp_dtype=AUTOCAST[path.precision],
            train=to_device_tensors(data, "train", dev),
            val=to_device_tensors(data, "val", dev),
            batch_size=batch_size,
            augment=Augment.of(t, data.image_size, data.mean, data.std, dev),
            loss_fn=nn.CrossEntropyLoss(label_smoothing=float(t["label_smoothing"])),
            step_hook=step_hook,
            diverged=functools.partial(
                diverged, steps=steps, lr_key=plan.lr_key, lr=plan.lr, mixed_precision=float16
            ),
            resume_dir=resume_dir,
            save=save,
            teacher=None if teacher is None else teacher.to(dev),
        )
        if path.compile:
            trainer.graph = GraphStep(trainer.step, optimizer)
        return trainer

    @property
    def val_size(self) -> int:
        return len(self.val[1])

    def train_epoch(self, epoch: int, label: str) -> dict[str, float]:
        """Train one epoch (1-based) in a fresh random order, then score the val split."""
        n, dev = len(self.train[1]), self.device
        order, shifts, flips = self.augment.draw(n, self.generator, dev)
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
        for i, (start, stop) in enumerate(track(bounds, total=len(bounds), description=label)):
            idx = order[start:stop]
            weight = None
            if self.world > 1:
                idx = idx[self.rank :: self.world]  # this process's share of the global batch
                # DDP averages the processes' gradients; weighting each mean loss by its share
                # of the batch makes that the gradient of the whole batch's mean loss.
                weight = len(idx) * self.world / (stop - start)
            if self.graph is not None and stop - start == self.batch_size:
                loss, hits = self.graph(idx, shifts, flips)
            else:  # uncompiled, or the epoch's last and smaller batch
                loss, hits = self.step(idx, shifts, flips, weight)
            step += 1
            if self.step_hook is not None:
                self.step_hook(step)
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()  # per iteration: warm-up and cosine are smooth within epochs
            step_losses[i] = loss
            loss_sum += loss * len(idx)
            correct += hits
        self._check_finite_losses(epoch, step_losses)
        if self.world > 1:
            loss_sum = distributed.sum_over_processes(loss_sum)
            correct = distributed.sum_over_processes(correct)
        val_loss, val_top1 = evaluate_split(
            self.model, *self.val, self.batch_size, self.amp_dtype or False
        )
        return {
            "train_loss": loss_sum.item() / n,
            "train_top1": correct.item() / n,
            "val_loss": val_loss,
            "val_top1": val_top1,
            "lr": lr,
        }

    def step(
        self,
        idx: torch.Tensor,
        shifts: torch.Tensor,
        flips: torch.Tensor,
        weight: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on the training images ``idx`` (augmented by the epoch's
        ``shifts`` and ``flips``); returns the batch's mean loss (float32) and its number of
        correct predictions, on the device. ``weight`` scales the loss that is differentiated.

        No host sync, so that ``cuda_graph.GraphStep`` can capture it.
        """
        x, y = self.train
        xb, yb = self.augment(x[idx], shifts[idx], flips[idx]), y[idx]
        if self.graph is not None:
            # NHWC activations: the layout tensor cores convolve in, without a transpose per
            # layer. The weights stay NCHW (what is saved); their casts are per step anyway.
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(self.amp_dtype, self.device):
            logits = self.forward(xb)
            loss = self.loss_fn(logits, yb)
            if self.teacher is not None:
                loss = self.teacher.loss(xb, logits, loss)
        objective = loss if weight is None else loss * weight
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(objective).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach().float(), (logits.detach().argmax(1) == yb).sum()

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
            raise self.diverged(float(step_losses[first]), epoch=epoch, step=first + 1)
        raise self.diverged(math.nan, epoch=epoch, step=None)  # another process saw it first

    def check_finite_weights(self, epoch: int) -> None:
        """Raise ``training.diverged`` if a parameter of the model to keep is NaN or infinite
        (the last step of the last epoch can break them with no validation split to show it)."""
        for p in self.model.parameters():
            broken = p.detach()[~torch.isfinite(p.detach())]
            if broken.numel():
                raise self.diverged(float(broken[0]), epoch=epoch, step=None, what="a weight")

    def keep_best(self) -> None:
        self.best_model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def restore_best(self) -> None:
        self.model.load_state_dict(self.best_model)

    def save_model(self) -> None:
        """Rank 0 writes the model; the other data-parallel processes write nothing."""
        if self.rank == 0:
            self.save(self.model)

    def _state_file(self) -> StateFile:
        return StateFile(self.resume_dir, self.device)

    def resume(self, fingerprint: str) -> dict[str, Any] | None:
        """Every process resumes from rank 0's state, which only rank 0 deletes."""
        state = matching_state(self._state_file(), fingerprint, owner=self.rank == 0)
        if self.world > 1:
            distributed.check_same(int(state["epoch"]) if state else 0, "the epoch to resume from")
        if state is not None:
            self.restore(state)
            self.best_model = state["best_model"]
        return state

    def save_state(self, state: dict[str, Any]) -> None:
        """Rank 0 writes the state; the other data-parallel processes write nothing."""
        if self.rank == 0:
            self._state_file().write({**state, **self.snapshot(), "best_model": self.best_model})

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
        if self.graph is not None:
            self.graph.reset()  # the optimizer's momentum buffers are new tensors


@torch.no_grad()
def evaluate_split(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, amp: torch.dtype | bool
) -> tuple[float, float]:
    """Mean cross-entropy and top-1 over a split in eval mode; NaN for an empty split.

    ``amp``: the autocast dtype of the forward passes; True is float16, False float32.

    The loss is plain cross-entropy whatever train.label_smoothing, so that validation losses
    compare between settings.
    """
    if len(y) == 0:
        return math.nan, math.nan
    dtype = amp if isinstance(amp, torch.dtype) else AUTOCAST["float16" if amp else "float32"]
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        with autocast(dtype, x.device):
            logits = model(xb)
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    return loss_sum.item() / len(y), correct.item() / len(y)
