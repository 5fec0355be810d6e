"""What ``train.precision`` and ``train.compile`` ask of a run, resolved for the device it trains
on, the same way on both backends.

The defaults (``auto``) take the fast path on a GPU and change nothing on a CPU: a CPU run
computes in float32, uncompiled, exactly as before these keys existed. ``train.mixed_precision:
true`` is the older spelling of ``train.precision: float16`` and still means that.
"""

from __future__ import annotations

from dataclasses import dataclass

from shrinkflow.errors import ShrinkflowError
from shrinkflow.progress import say

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
COMPILE = ("auto", True, False)


@dataclass(frozen=True)
class FastPath:
    """How a run's training step computes.

    precision: float32, bfloat16 or float16 (float16 needs loss scaling; bfloat16 has float32's
        range and needs none).
    compile: compile the whole step (torch: one CUDA graph; TensorFlow: XLA).
    """

    precision: str
    compile: bool

    @property
    def mixed(self) -> bool:
        return self.precision != "float32"


def requested_precision(t: dict) -> tuple[str, str]:
    """``(precision, key)``: what ``train`` asks for and the params key that asked."""
    precision = t["precision"]
    if precision not in PRECISIONS:
        raise ShrinkflowError(
            f"train.precision: {precision!r} is not one of {', '.join(PRECISIONS)}"
        )
    if not t["mixed_precision"]:
        return precision, "train.precision"
    if precision not in ("auto", "float16"):
        raise ShrinkflowError(
            f"train.mixed_precision: true asks for float16 but train.precision is {precision}; "
            "drop train.mixed_precision (the older spelling of train.precision: float16)"
        )
    return "float16", "train.mixed_precision"


def resolve(t: dict, *, gpu: bool, bfloat16: bool, compile_on_cpu: bool) -> FastPath:
    """The ``FastPath`` of ``cfg["train"]`` on a GPU (``gpu``; ``bfloat16``: it computes in
    bfloat16 natively) or a CPU.

    ``precision: auto`` is bfloat16 on a GPU that has it and float32 elsewhere: float16 is never
    chosen for the user, because its narrow range can overflow where float32 would not (it is
    there to ask for on older GPUs). ``compile: auto`` compiles on a GPU only; ``compile: true``
    also compiles on a CPU where the backend can (``compile_on_cpu``), else it is ignored there.
    A CPU run never computes in reduced precision: it is ignored there, with one line saying so.
    """
    precision, key = requested_precision(t)
    compile_ = t["compile"]
    if compile_ not in COMPILE:
        raise ShrinkflowError(f"train.compile: {compile_!r} is not auto, true or false")
    if not gpu:
        if precision not in ("auto", "float32"):
            say(f"{key}: ignored on CPU ({precision} mixed precision needs a GPU)")
        if compile_ is True and not compile_on_cpu:
            say("train.compile: ignored on CPU (this backend compiles the step on GPUs only)")
        return FastPath("float32", compile_ is True and compile_on_cpu)
    if precision == "auto":
        precision = "bfloat16" if bfloat16 else "float32"
    elif precision == "bfloat16" and not bfloat16:
        raise ShrinkflowError(
            "train.precision: bfloat16 needs a GPU that computes in it (NVIDIA compute "
            "capability 8.0 or later) and this one does not; use auto, float16 or float32"
        )
    return FastPath(precision, compile_ is not False)


def without_fast_path(cfg: dict, job: str, why: str) -> dict:
    """A copy of ``cfg`` whose ``train`` computes in float32, uncompiled, for a ``job`` that
    must train that way (``why``); one line names the keys it overrides that asked for more.
    The caller's ``cfg`` is not changed (its resume fingerprint hashes what the user wrote)."""
    t = cfg["train"]
    asked = {
        "train.mixed_precision": bool(t["mixed_precision"]),
        "train.precision": t["precision"] not in ("auto", "float32"),
        "train.compile": t["compile"] is True,
    }
    if any(asked.values()):
        say(f"{job}: {', '.join(k for k, v in asked.items() if v)} ignored ({why})")
    plain = {"mixed_precision": False, "precision": "float32", "compile": False}
    return {**cfg, "train": {**t, **plain}}
