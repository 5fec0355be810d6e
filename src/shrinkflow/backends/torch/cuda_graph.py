"""A training step captured whole as one CUDA graph (forward, loss, backward, optimizer step)
and replayed: ``train.compile`` on a CUDA device.

A replay launches the step's few hundred kernels with one call, which is what small models at
CIFAR sizes are limited by (the host's launch rate, not the GPU). The graph replays fixed
addresses with fixed shapes, so:

- its inputs are copied into static buffers before each replay, and its outputs are static
  tensors overwritten by the next replay (read them, on the same stream, before that);
- it serves full batches only; the caller runs an epoch's last, smaller batch eagerly with the
  same step, so every image is still seen once per epoch;
- the optimizer must be fused (``torch.optim.SGD(fused=True)``) and read its learning rate from
  a device tensor during capture, refilled from the scheduler's float before every replay; the
  optimizer's and scheduler's own state keep plain floats, so resume states are the same as an
  uncompiled run's;
- the step must not sync with the host (no ``.item()``) and must not replace the model's
  parameters or buffers (in-place updates, such as a step hook's masks, are fine).

The first ``WARMUP_STEPS`` steps run eagerly on a side stream, as PyTorch's CUDA graph notes
require before a capture (lazy initialisation, the optimizer's momentum buffers); they are real
training steps, not extra ones. Capturing runs nothing, so the captured step is then replayed
once to perform it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WARMUP_STEPS = 3  # PyTorch's CUDA graph notes warm up with 3 eager iterations

Step = Callable[..., tuple[torch.Tensor, ...]]


class GraphStep:
    """``step(*args)`` (tensors in, tensors out) as a CUDA graph over ``optimizer``'s params."""

    def __init__(self, step: Step, optimizer: torch.optim.Optimizer) -> None:
        if not all(g.get("fused") for g in optimizer.param_groups):
            raise ValueError("GraphStep needs a fused optimizer (its step is capturable)")
        self.step, self.optimizer = step, optimizer
        self.reset()

    def reset(self) -> None:
        """Forget the graph (after the optimizer's state was replaced, say by a resume): the
        next steps warm up and capture again."""
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, ...] = ()
        self.outputs: tuple[torch.Tensor, ...] = ()
        self.lrs: list[torch.Tensor] = []
        self.warm_steps = 0

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One training step on ``args``; always the same shapes as the first call's."""
        if self.graph is None and self.warm_steps < WARMUP_STEPS:
            self.warm_steps += 1
            return self._on_side_stream(args)
        if self.graph is None:
            self._capture(args)
        for buffer, arg in zip(self.inputs, args, strict=True):
            buffer.copy_(arg)
        for lr, group in zip(self.lrs, self.optimizer.param_groups, strict=True):
            lr.fill_(group["lr"])
        self.graph.replay()
        return self.outputs

    def _on_side_stream(self, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            outputs = self.step(*args)
        current.wait_stream(side)
        return outputs

    def _capture(self, args: tuple[torch.Tensor, ...]) -> None:
        """Record the step on static copies of ``args``, with the learning rates as tensors."""
        groups = self.optimizer.param_groups
        self.inputs = tuple(a.clone() for a in args)
        self.lrs = [torch.tensor(float(g["lr"]), device=args[0].device) for g in groups]
        floats = [g["lr"] for g in groups]
        for group, lr in zip(groups, self.lrs, strict=True):
            group["lr"] = lr
        # Gradients are allocated by the captured backward, in the graph's memory pool.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.outputs = self.step(*self.inputs)
        finally:
            for group, lr in zip(groups, floats, strict=True):
                group["lr"] = lr
        self.graph = graph
