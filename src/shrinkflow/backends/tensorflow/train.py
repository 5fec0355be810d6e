"""Train a tf-keras model on prepared data: the TensorFlow twin of ``backends/torch/train.py``.

One loop (``fit``) serves every stage that trains: the baseline (``train_model``), fine-tuning
and gradual pruning, which hook into it with Keras callbacks (tfmot's ``UpdatePruningStep``,
``finetune.KeepZeros``). It runs ``model.fit`` one epoch at a time and copies torch's recipe:
SGD in torch's form (coupled weight decay on conv/dense kernels only, momentum buffer, Nesterov),
linear warm-up from lr/10 then cosine to 0 per step, random crop of the zero-padded image and
optional horizontal flip, label smoothing, the same batch split and best-on-val selection.

Reproducibility: the weight init comes from ``cfg["seed"]``; an epoch's batch order and
augmentation are drawn from a NumPy generator seeded with ``(seed, epoch)``, a pure function of
the two, so nothing but weights and optimizer state has to survive a resume. On CPU (with op
determinism on and a fixed thread count) two runs end with bit-identical weights, and a killed
run resumed from its last saved epoch ends bit-identical to an uninterrupted one. The resume
state is a ``tf.train.Checkpoint`` (model variables, BN statistics and any tfmot mask,
threshold and step variables included; optimizer step counter and momenta; the best epoch's
weights) plus ``state.json``, which is written last and names its checkpoint.

Distribution: with more than one GPU visible every model and optimizer lives in one
``MirroredStrategy`` (see ``distribution_strategy``); ``cfg["train"]["batch_size"]`` is the
global batch, split over the replicas. In the worker started by ``distributed.launch``
(``train.distributed.processes`` = N > 1) it is a ``MirroredStrategy`` over N devices (N GPUs,
or N logical CPUs), and each replica takes an interleaved share of each global batch, with
sample weights that make the summed gradient that of the whole batch's mean loss. BatchNorm
statistics are per replica while training and averaged over the replicas when read. (Why one
process rather than one per replica: see ``distributed``.)
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

import functools  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from shrinkflow.backends.tensorflow import distributed  # noqa: E402
from shrinkflow.backends.tensorflow.artifact import save_model  # noqa: E402
from shrinkflow.backends.tensorflow.models import OUTPUT_LAYER, create_model  # noqa: E402
from shrinkflow.backends.workers import collectives_on_loopback  # noqa: E402
from shrinkflow.data.prepared import PreparedData  # noqa: E402
from shrinkflow.errors import ShrinkflowError  # noqa: E402
from shrinkflow.outputs import atomic_dir, read_json, write_json  # noqa: E402
from shrinkflow.progress import say, track  # noqa: E402
from shrinkflow.training import NO_VALIDATION_IMAGES as NO_VAL  # noqa: E402
from shrinkflow.training import (  # noqa: E402
    TrainResult,
    batch_bounds,
    diverged,
    global_batches,
    model_spec,
)

STATE_FILE = "state.json"
# Bumped whenever the resume state's layout or the training procedure changes, so that an old
# state is never resumed by code that would continue it differently.
STATE_FORMAT = "shrinkflow.tensorflow.train-state/1"
CHECKPOINT_PREFIX = "epoch-"  # resume_dir/epoch-0003/ckpt.*: the checkpoint after epoch 3

# The recipe constants both backends share (torch: backends/torch/train.py), kept equal so that
# the two backends train the same way on the same data.
WARMUP_START = 0.1  # the LR factor at step 0 of the warm-up (lr/10), rising linearly to 1
CROP_PAD_DIVISOR = 8  # crop padding = image_size // 8: CIFAR's 4 pixels at 32x32, scaled


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
    state = _read_state(Path(resume_dir))
    if state is None or state.get("fingerprint") != fingerprint:
        return None
    return state.get("run_id")


def steps_per_epoch(cfg: dict, data: PreparedData) -> int:
    """Optimizer steps in one epoch over the training split with ``cfg["train"]["batch_size"]``."""
    return len(batch_bounds(len(data.train), int(cfg["train"]["batch_size"])))


@functools.cache
def distribution_strategy() -> tf.distribute.Strategy:
    """The process's one strategy: ``MirroredStrategy`` over ``distributed.replicas()`` devices
    in the worker started by ``distributed.launch`` (one GPU each where there are GPUs, else
    logical CPUs), else ``MirroredStrategy`` over all GPUs when there are several, else the
    default (single-device) strategy.

    A model given to ``fit`` must have been created in ``distribution_strategy().scope()``
    (Keras compiles a model only in the strategy that owns its variables); ``train_model`` and
    ``finetune_model`` do so. Cached, because a second ``MirroredStrategy`` would be another
    strategy than the one the model was built in.
    """
    replicas = distributed.replicas()
    gpus = tf.config.list_physical_devices("GPU")
    if replicas > 1 or len(gpus) > 1:
        collectives_on_loopback()  # NCCL's bootstrap sockets, before its first use
    if replicas > 1:
        if gpus:
            if replicas > len(gpus):
                raise ShrinkflowError(
                    f"train.distributed.processes: {replicas} is more than the {len(gpus)} "
                    "GPU(s) of this node (one GPU per replica)"
                )
            devices = [f"/gpu:{i}" for i in range(replicas)]
        else:
            # Before TensorFlow's runtime starts, which nothing in a train worker has made it do.
            tf.config.set_logical_device_configuration(
                tf.config.list_physical_devices("CPU")[0],
                [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)],
            )
            devices = [f"/cpu:{i}" for i in range(replicas)]
        say(f"train: {replicas} data-parallel replicas in one process ({', '.join(devices)})")
        return tf.distribute.MirroredStrategy(devices)
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def train_model(
    cfg: dict,
    model_name: str,
    data: PreparedData,
    out_dir: Path,
    resume_dir: Path,
    on_epoch: Callable[[int, dict[str, float]], None],
    run_id: str | None = None,
) -> TrainResult:
    """Train a fresh ``model_name`` with ``cfg["train"]`` and save its best-on-val epoch.

    The arguments are those of ``fit``; the model is initialised from ``cfg["seed"]``.
    """
    t = cfg["train"]
    epochs = int(t["epochs"])
    if epochs < 1:
        raise ShrinkflowError(f"train.epochs: {epochs} is not >= 1")
    _reproducible(cfg["seed"])
    with distribution_strategy().scope():
        model = create_model(
            model_name, data.num_classes, data.channels, data.image_size, data.mean, data.std
        )
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
    )


def fit(
    model: keras.Model,
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
    callbacks: Sequence[keras.callbacks.Callback] = (),
    select_from_epoch: int = 1,
    save: Callable[[keras.Model, Path], None] | None = None,
    prepare: Callable[[keras.Model], None] | None = None,
    lr_key: str = "train.lr",
) -> TrainResult:
    """Train ``model`` for ``epochs`` and save its best-on-val epoch to ``out_dir``.

    ``model`` takes raw 0..255 float32 pixels and returns logits, and must have been created
    in ``distribution_strategy().scope()``. Batch size, momentum, Nesterov, weight decay,
    augmentation, label smoothing, the LR schedule's shape and mixed precision come from
    ``cfg["train"]``; ``lr`` is the peak LR reached after ``warmup_epochs``.

    Args:
        out_dir: an existing empty folder (the caller renames it into place) that receives
            the model, written by ``artifact.save_model(model, spec, out_dir)``; the test
            split is never read here.
        resume_dir: where the per-epoch resume state lives; a state with the same
            ``fingerprint`` is continued, any other one is deleted.
        fingerprint: hash of everything that decides the result (see ``fingerprint_of``).
        on_epoch: called after every epoch (1-based) with train_loss, train_top1, val_loss,
            val_top1, lr (of the epoch's last step) and epoch_seconds.
        run_id: stored with the resume state, so a resumed job continues the same MLflow run.
        callbacks: Keras callbacks for every ``model.fit`` call (one per epoch). They must act
            on ``self.model``: with mixed precision that is a float16 twin of ``model``.
        select_from_epoch: only epochs from this one on compete for best-on-val (gradual
            pruning: the epochs at which the target sparsity is reached); clamped to ``epochs``.
        save: writes the best model into ``out_dir`` instead of ``artifact.save_model`` (for
            a model that needs another format, such as a tfmot-wrapped one to strip first).
        prepare: called once with the model to train, compiled, inside the strategy scope and
            before the resume state is restored: the place to create variables that the
            checkpoint must hold.
        lr_key: the params key ``lr`` comes from, named by the error that stops a run whose
            loss becomes NaN or infinite (``training.diverged``).

    ``model`` holds the best epoch's weights (all of them: BN statistics, masks) when this
    returns.
    """
    started = time.perf_counter()
    if epochs < 1:
        raise ValueError(f"fit: epochs {epochs} is not >= 1")
    select_from_epoch = min(select_from_epoch, epochs)
    t = cfg["train"]
    batch_size = int(t["batch_size"])
    if batch_size < 1:
        raise ShrinkflowError(f"train.batch_size: {batch_size} is not >= 1")
    if len(data.train) == 0:
        raise ShrinkflowError(
            "prepared data has no training images "
            "(lower data.val_fraction / data.test_fraction or add images)"
        )
    _reproducible(cfg["seed"])
    amp = _mixed_precision(t)
    replicas = distributed.replicas()
    if batch_size % replicas:
        raise ShrinkflowError(
            f"train.batch_size: {batch_size} does not divide among {replicas} processes "
            "(train.distributed.processes)"
        )
    bounds = global_batches(len(data.train), batch_size, replicas)
    strategy = distribution_strategy()
    with strategy.scope():
        trained = _with_policy(model, "mixed_float16") if amp else model
        schedule = LRSchedule(lr, t["schedule"], warmup_epochs * len(bounds), epochs * len(bounds))
        _compile(trained, t, schedule, amp)
        if prepare is not None:
            prepare(trained)
    run = _ResumeState(trained, strategy, recompile=lambda: _compile(trained, t, schedule, amp))
    state = run.load(Path(resume_dir), fingerprint)
    start_epoch, best_val_top1, best_epoch, history = 0, -1.0, 0, []
    if state is not None:
        start_epoch = int(state["epoch"])
        if start_epoch < epochs:
            say(f"resuming from epoch {start_epoch + 1}/{epochs}")
        else:
            say(f"all {epochs} epochs already trained (resume state); saving the best one")
        best = state["best_val_top1"]  # null for NaN: no validation images (_ResumeState.save)
        best_val_top1 = math.nan if best is None else float(best)
        best_epoch, history = int(state["best_epoch"]), list(state["history"])
    val_size = len(data.val)
    if val_size == 0:
        say("no validation images, so the last epoch is kept instead of the best one")

    epoch_data = _EpochData(
        data, batch_size, bool(t["augment"]), bool(t["hflip"]), cfg["seed"], replicas
    )

    def stop(value: float, epoch: int, step: int | None, what: str = "loss") -> ShrinkflowError:
        return diverged(
            value,
            epoch=epoch,
            step=step,
            steps=len(bounds),
            lr_key=lr_key,
            lr=lr,
            mixed_precision=amp,
            what=what,
        )

    for epoch in range(start_epoch + 1, epochs + 1):
        label = f"epoch {epoch}/{epochs}"
        epoch_start = time.perf_counter()
        guard = _StopOnNonFinite()
        fitted = trained.fit(
            epoch_data.batches(epoch),
            epochs=epoch,
            initial_epoch=epoch - 1,
            steps_per_epoch=len(bounds) if replicas > 1 else None,  # a distributed data set's
            verbose=0,
            callbacks=[*callbacks, _Progress(len(bounds), label), guard],
        ).history
        if guard.bad is not None:
            raise stop(guard.bad[1], epoch, guard.bad[0])
        val_loss, val_top1 = evaluate_split(trained, data, "val", batch_size)
        if val_size and not math.isfinite(val_loss):
            # The last steps' updates broke the weights after their losses were computed.
            raise stop(val_loss, epoch, None, what="validation loss")
        metrics = {
            "train_loss": float(fitted["loss"][-1]),
            "train_top1": float(fitted["top1"][-1]),
            "val_loss": val_loss,
            "val_top1": val_top1,
            "lr": float(schedule(trained.optimizer.iterations - 1)),
            "epoch_seconds": time.perf_counter() - epoch_start,
        }
        history.append({"epoch": epoch, **metrics})
        # Ties go to the later epoch: equally accurate, but trained longer.
        if epoch >= select_from_epoch and (val_size == 0 or val_top1 >= best_val_top1):
            best_val_top1, best_epoch = val_top1, epoch
            run.keep_best()
        _say_epoch(label, metrics)
        on_epoch(epoch, metrics)
        run.save(
            Path(resume_dir),
            epoch,
            {
                "format": STATE_FORMAT,
                "fingerprint": fingerprint,
                "run_id": run_id,
                "epoch": epoch,
                "best_val_top1": best_val_top1,
                "best_epoch": best_epoch,
                "history": history,
            },
        )

    run.load_best()
    for weight in trained.trainable_weights:
        values = weight.numpy()
        if not np.isfinite(values).all():
            raise stop(float(values[~np.isfinite(values)][0]), epochs, None, what="a weight")
    if trained is not model:
        model.set_weights(trained.get_weights())
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


def evaluate_split(
    model: keras.Model, data: PreparedData, split: str, batch_size: int
) -> tuple[float, float]:
    """Mean cross-entropy and top-1 of ``model`` on the "val" or "test" split; NaN if empty.

    The loss is plain cross-entropy whatever train.label_smoothing, so that validation losses
    compare between settings.
    """
    if split not in ("val", "test"):
        raise ShrinkflowError(f"split {split!r} is not val or test")
    index = getattr(data, split)
    if len(index) == 0:
        return math.nan, math.nan
    pixels = tf.data.Dataset.from_tensor_slices(data.images[index]).batch(batch_size)
    logits = model.predict(pixels.map(_to_float), verbose=0).astype(np.float64)
    labels = data.labels[index]
    log_probs = logits - logits.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    return float(loss), float((logits.argmax(1) == labels).mean())


class LRSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Peak ``lr`` times torch's ``_lr_factor``: linear from lr/10 to lr over the warm-up, then
    cosine to 0 at ``total_steps`` (just after the last step) or flat.

    Evaluated at the optimizer's step counter, which the resume state holds, so a resumed run
    continues the schedule where it stopped. Computed in float64, as torch does in Python.
    """

    def __init__(self, lr: float, schedule: str, warmup_steps: int, total_steps: int) -> None:
        if schedule not in ("cosine", "constant"):
            raise ShrinkflowError(f"train.schedule: {schedule!r} is not cosine or constant")
        self.lr, self.schedule = float(lr), schedule
        self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)

    def __call__(self, step: Any) -> tf.Tensor:
        step = tf.cast(step, tf.float64)
        warmup = tf.constant(float(self.warmup_steps), tf.float64)
        rising = WARMUP_START + (1.0 - WARMUP_START) * step / tf.maximum(warmup, 1.0)
        if self.schedule == "constant":
            after = tf.constant(1.0, tf.float64)
        else:
            progress = (step - warmup) / max(1, self.total_steps - self.warmup_steps)
            after = 0.5 * (1.0 + tf.cos(math.pi * tf.minimum(progress, 1.0)))
        factor = tf.where(step < warmup, rising, after)
        return tf.cast(self.lr * factor, tf.float32)

    def get_config(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "schedule": self.schedule,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
        }


class TorchSGD(keras.optimizers.SGD):
    """SGD with the update rule of ``torch.optim.SGD``, so both backends optimise alike.

    torch keeps ``buf = momentum * buf + g`` and steps ``w -= lr * buf`` (Nesterov:
    ``w -= lr * (g + momentum * buf)``); Keras' SGD folds the LR into the velocity, which
    differs as soon as the LR changes from step to step. Weight decay is torch's coupled L2:
    ``weight_decay * w`` joins the gradient before the momentum, which is the gradient of
    ``weight_decay / 2 * |w|^2`` in the loss, not Keras' decoupled ``weight_decay`` (a shrink
    by ``lr * weight_decay * w`` outside the momentum). It applies to conv and dense kernels
    only, the variables with two or more dimensions, as torch's ``_param_groups`` does: not to
    BN scales and shifts nor biases.
    """

    def __init__(self, *args: Any, coupled_weight_decay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.coupled_weight_decay = float(coupled_weight_decay)

    def update_step(self, gradient: Any, variable: tf.Variable) -> None:
        gradient = tf.convert_to_tensor(gradient)
        lr = tf.cast(self.learning_rate, variable.dtype)
        if self.coupled_weight_decay and len(variable.shape) > 1:
            gradient += tf.cast(self.coupled_weight_decay, variable.dtype) * variable
        momentum = tf.cast(self.momentum, variable.dtype)
        buf = self.momentums[self._index_dict[self._var_key(variable)]]
        buf.assign(momentum * buf + gradient)
        variable.assign_sub(lr * (gradient + momentum * buf if self.nesterov else buf))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "coupled_weight_decay": self.coupled_weight_decay}


def _compile(model: keras.Model, t: dict, schedule: LRSchedule, amp: bool) -> None:
    """Compile ``model`` with a fresh optimizer whose variables exist (restorable) at once."""
    optimizer: keras.optimizers.Optimizer = TorchSGD(
        learning_rate=schedule,
        momentum=float(t["momentum"]),
        nesterov=bool(t["nesterov"]),
        coupled_weight_decay=float(t["weight_decay"]),
        # XLA-fused updates pay on a GPU; on a CPU compiling them costs more than they save.
        jit_compile=bool(tf.config.list_physical_devices("GPU")),
    )
    if amp:
        optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
    # One-hot labels: Keras' label smoothing needs them (the sparse loss has none). Keras
    # smooths as torch does: (1 - s) * one_hot + s / num_classes.
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=float(t["label_smoothing"])
        ),
        metrics=[keras.metrics.CategoricalAccuracy(name="top1")],
    )
    optimizer.build(model.trainable_variables)


class _ResumeState:
    """The checkpointed part of a run (model and optimizer variables, the best epoch's weights)
    and its saving/restoring next to ``state.json``."""

    def __init__(
        self, model: keras.Model, strategy: tf.distribute.Strategy, recompile: Callable[[], None]
    ) -> None:
        self.model, self.strategy, self.recompile = model, strategy, recompile
        self.initial = model.get_weights()  # to undo a restore that fails half-way
        # Kept on the host: a copy of the weights needs no accelerator memory.
        with tf.device("/CPU:0"):
            self.best = tf.Module()
            self.best.values = [tf.Variable(w, trainable=False) for w in self.initial]
        self.checkpoint = self._checkpoint()

    def _checkpoint(self) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer, best=self.best)

    def keep_best(self) -> None:
        for kept, weight in zip(self.best.values, self.model.get_weights(), strict=True):
            kept.assign(weight)

    def load_best(self) -> None:
        self.model.set_weights([w.numpy() for w in self.best.values])

    def save(self, resume_dir: Path, epoch: int, state: dict[str, Any]) -> None:
        """Write the checkpoint into its own folder, then ``state.json`` naming it, then drop
        older checkpoints: a kill at any moment leaves a state whose checkpoint exists."""
        name = f"{CHECKPOINT_PREFIX}{epoch:04d}"
        with atomic_dir(resume_dir / name) as tmp:
            self.checkpoint.write(str(tmp / "ckpt"))
        write_json(resume_dir / STATE_FILE, {**state, "checkpoint": name}, nan_means=NO_VAL)
        _remove_checkpoints(resume_dir, keep=name)

    def load(self, resume_dir: Path, fingerprint: str) -> dict | None:
        """Restore the resume state in ``resume_dir`` saved for ``fingerprint`` and return its
        ``state.json``; None when there is none to continue, and then any state there is
        deleted."""
        state = _read_state(resume_dir)
        if state is not None and state.get("fingerprint") != fingerprint:
            say(f"{resume_dir / STATE_FILE}: saved for other params, data or model; starting over")
            state = None
        if state is not None:
            prefix = resume_dir / state["checkpoint"] / "ckpt"
            try:
                with self.strategy.scope():
                    self.checkpoint.read(str(prefix)).assert_existing_objects_matched()
            except Exception as e:  # TensorFlow raises many kinds for a damaged checkpoint
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                say(f"{prefix}: unreadable resume checkpoint ignored ({reason}); starting over")
                self._undo_restore()
                state = None
        if state is None:
            # A stale state must not be resumed by a later run either.
            (resume_dir / STATE_FILE).unlink(missing_ok=True)
            _remove_checkpoints(resume_dir, keep=None)
        return state

    def _undo_restore(self) -> None:
        """Back to the state before a failed restore: initial weights, a fresh optimizer."""
        self.model.set_weights(self.initial)
        for kept, weight in zip(self.best.values, self.initial, strict=True):
            kept.assign(weight)
        with self.strategy.scope():
            self.recompile()
        self.checkpoint = self._checkpoint()


def _remove_checkpoints(resume_dir: Path, keep: str | None) -> None:
    for folder in resume_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        if folder.name != keep and folder.is_dir():
            shutil.rmtree(folder)


def _read_state(resume_dir: Path) -> dict | None:
    """``state.json`` in ``resume_dir`` if it is one this code can continue, else None.

    The state is a cache: an unreadable one is reported and ignored rather than failing the job.
    """
    path = resume_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = read_json(path)
    except (OSError, ValueError) as e:
        say(f"{path}: unreadable resume state ignored ({e})")
        return None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        say(f"{path}: resume state of another format ignored")
        return None
    if not (resume_dir / str(state.get("checkpoint")) / "ckpt.index").is_file():
        say(f"{path}: its checkpoint {state.get('checkpoint')!r} is missing; ignored")
        return None
    return state


class _EpochData:
    """The training split as one tensor, and each epoch's batches: order, crops and flips drawn
    from ``(seed, epoch)`` alone, so epoch e is the same batches in every run and resume.

    ``replicas`` > 1: each global batch as that many interleaved shares, one per replica of
    ``distribution_strategy()``, each weighted by its share (see the module docstring).
    """

    def __init__(
        self,
        data: PreparedData,
        batch_size: int,
        augment: bool,
        hflip: bool,
        seed: int,
        replicas: int = 1,
    ) -> None:
        with tf.device("/CPU:0"):  # the input pipeline runs on the host
            self.images = tf.constant(data.images[data.train])
            self.labels = tf.constant(data.labels[data.train])
        self.num_classes = data.num_classes
        self.replicas = replicas
        self.bounds = global_batches(len(data.train), batch_size, replicas)
        self.pad = data.image_size // CROP_PAD_DIVISOR if augment else 0
        self.hflip = augment and hflip
        self.seed = int(seed)

    def batches(self, epoch: int) -> tf.data.Dataset | tf.distribute.DistributedDataset:
        n = len(self.labels)
        rng = np.random.default_rng([self.seed, epoch])
        order = tf.constant(rng.permutation(n))
        shifts = tf.constant(rng.integers(0, 2 * self.pad + 1, (n, 2)))
        flips = tf.constant(rng.random(n) < 0.5)
        starts = tf.constant([s for s, _ in self.bounds], tf.int64)
        stops = tf.constant([s for _, s in self.bounds], tf.int64)

        def batch(i: tf.Tensor, replica: tf.Tensor | int = 0) -> tuple[tf.Tensor, ...]:
            idx = order[starts[i] : stops[i]]
            if self.replicas > 1:
                idx = idx[replica :: self.replicas]
            x = augment_batch(
                tf.gather(self.images, idx),
                tf.gather(shifts, idx),
                tf.gather(flips, idx) if self.hflip else None,
                self.pad,
            )
            y = tf.one_hot(tf.gather(self.labels, idx), self.num_classes)
            if self.replicas == 1:
                return _to_float(x), y
            # Keras divides each replica's loss sum by its batch and by the number of replicas.
            share = tf.cast(tf.size(idx) * self.replicas, tf.float32) / tf.cast(
                stops[i] - starts[i], tf.float32
            )
            return _to_float(x), y, tf.fill(tf.shape(idx), share)

        steps = tf.data.Dataset.range(len(self.bounds))
        if self.replicas == 1:
            return steps.map(batch).prefetch(tf.data.AUTOTUNE)
        # Every batch as its shares in replica order: the strategy hands consecutive elements to
        # its replicas in turn (a plain data set would be rebatched into contiguous halves,
        # unweighted).
        shares = steps.flat_map(
            lambda i: tf.data.Dataset.range(self.replicas).map(lambda r: batch(i, r))
        ).prefetch(tf.data.AUTOTUNE)
        return distribution_strategy().distribute_datasets_from_function(lambda _: shares)


def augment_batch(x: tf.Tensor, shifts: tf.Tensor, flips: tf.Tensor | None, pad: int) -> tf.Tensor:
    """Per image, a crop of the ``pad``-padded image back to its size at offset ``shifts`` (rows,
    columns), then a horizontal flip where ``flips`` is True (None: no flip).

    The padding is zeros on the 0..255 scale, i.e. black, as torchvision's RandomCrop(padding)
    before Normalize; the model normalises after.
    """
    if pad:
        h, w = x.shape[1], x.shape[2]
        padded = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        rows = shifts[:, 0:1] + tf.range(h, dtype=shifts.dtype)  # (B, H) rows to keep
        cols = shifts[:, 1:2] + tf.range(w, dtype=shifts.dtype)  # (B, W) columns to keep
        x = tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)
    if flips is not None:
        x = tf.where(flips[:, None, None, None], tf.reverse(x, axis=[2]), x)
    return x


def _to_float(x: tf.Tensor) -> tf.Tensor:
    """uint8 pixels -> the float32 0..255 the models take."""
    return tf.cast(x, tf.float32)


class _StopOnNonFinite(keras.callbacks.Callback):
    """Stops ``model.fit`` after the first batch whose loss is NaN or infinite and keeps
    ``bad = (step, loss)``, its 1-based step in the epoch; ``fit`` then raises.

    The logged loss is the epoch's running mean, which turns non-finite at exactly that batch and
    stays so. With several workers it is the mean over all of them, so every worker stops at the
    same batch. Reading it costs no extra host sync: ``_Progress`` already has Keras convert
    every batch's logs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bad: tuple[int, float] | None = None

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = float((logs or {}).get("loss", 0.0))
        if self.bad is None and not math.isfinite(loss):
            self.bad = (batch + 1, loss)
            self.model.stop_training = True


class _Progress(keras.callbacks.Callback):
    """``progress.track`` over an epoch's batches: a bar on a terminal, a few lines otherwise.

    ``track`` reports an item once the loop asks for the next one, so it is advanced at the
    start of every batch and drained when training ends.
    """

    def __init__(self, steps: int, description: str) -> None:
        super().__init__()
        self._steps = iter(track(range(steps), total=steps, description=description))

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        next(self._steps, None)

    def on_train_end(self, logs: dict | None = None) -> None:
        for _ in self._steps:
            pass


def _say_epoch(label: str, m: dict[str, float]) -> None:
    say(
        f"{label}: train loss {m['train_loss']:.4f} top1 {m['train_top1']:.4f}, "
        f"val loss {m['val_loss']:.4f} top1 {m['val_top1']:.4f}, lr {m['lr']:.5f}, "
        f"{m['epoch_seconds']:.1f} s"
    )


def _reproducible(seed: int) -> None:
    """Seed Python's, NumPy's and TensorFlow's global RNGs (weight init), and turn on
    deterministic kernels when no GPU is visible, where they cost nothing.

    Determinism stays on for the rest of the process (TensorFlow has no public switch back) and
    makes unseeded TensorFlow random ops errors, hence the seed here too. GPU runs keep
    TensorFlow's defaults: deterministic GPU kernels are slow, so a GPU run repeats its init and
    batches but not every bit (as on the torch backend).
    """
    keras.utils.set_random_seed(seed)
    if not tf.config.list_physical_devices("GPU"):
        tf.config.experimental.enable_op_determinism()


def _mixed_precision(t: dict) -> bool:
    """Whether to train in mixed_float16: asked for, and a GPU to run float16 on."""
    if not t["mixed_precision"]:
        return False
    if tf.config.list_physical_devices("GPU"):
        return True
    say("train.mixed_precision: ignored on CPU (mixed_float16 needs a GPU)")
    return False


def _with_policy(model: keras.Model, policy: str) -> keras.Model:
    """A copy of ``model`` (same graph, same weights) whose layers compute in ``policy``,
    except the input, the output layer (logits and loss stay float32, as Keras' mixed precision
    guide requires for a stable softmax) and wrapped layers.

    A wrapped layer (tfmot's pruning wrapper) stays float32 with its wrapper: the wrapper's
    ``weights = weights * mask`` runs in its compute dtype and would round the float32 master
    weights to float16 at every step. The saved model must stay float32 too (a float16 policy
    would be saved with it and slow it down on CPUs), hence a training twin rather than a
    global policy.
    """
    config = model.get_config()
    for layer in config["layers"]:
        _set_policy(layer, policy)
    # The model's own layer classes: a tfmot wrapper, say, deserialises without its scope.
    custom = {type(m).__name__: type(m) for m in model.submodules}
    twin = type(model).from_config(config, custom_objects=custom)
    twin.set_weights(model.get_weights())
    return twin


def _set_policy(layer: dict[str, Any], policy: str) -> None:
    """Set ``policy`` on a serialised layer, or float32 where ``_with_policy`` keeps it."""
    if layer["class_name"] == "InputLayer":
        return
    inner = layer["config"].get("layer")
    if isinstance(inner, dict):
        inner["config"]["dtype"] = layer["config"]["dtype"] = "float32"
    else:
        layer["config"]["dtype"] = "float32" if layer["config"]["name"] == OUTPUT_LAYER else policy
