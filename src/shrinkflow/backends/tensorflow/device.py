"""Where a TensorFlow run trains and how exactly: the distribution strategy, deterministic
kernels on CPU, and its fast path on GPUs (``train.precision``: a bfloat16 or float16 training
twin of the model; ``train.compile``: XLA)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

import functools  # noqa: E402
from typing import Any  # noqa: E402

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from shrinkflow.backends.tensorflow import distributed  # noqa: E402
from shrinkflow.backends.tensorflow.models import OUTPUT_LAYER  # noqa: E402
from shrinkflow.backends.workers import collectives_on_loopback  # noqa: E402
from shrinkflow.errors import ShrinkflowError  # noqa: E402
from shrinkflow.progress import say  # noqa: E402
from shrinkflow.training.fast_path import FastPath, resolve  # noqa: E402

# The Keras mixed-precision policy of each reduced precision (float32: no policy, no twin).
POLICIES = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


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


def reproducible(seed: int) -> None:
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


def fast_path(t: dict) -> FastPath:
    """``train.precision`` and ``train.compile`` on this process's devices
    (``training.fast_path.resolve``): a GPU run computes in bfloat16 where every GPU has it
    (compute capability 8.0+) and compiles its step with XLA; ``compile: true`` compiles on a
    CPU too (XLA's CPU backend); a CPU run is otherwise unchanged."""
    gpus = tf.config.list_physical_devices("GPU")
    bfloat16 = bool(gpus) and all(compute_capability(g) >= (8, 0) for g in gpus)
    return resolve(t, gpu=bool(gpus), bfloat16=bfloat16, compile_on_cpu=True)


def compute_capability(gpu: tf.config.PhysicalDevice) -> tuple[int, int]:
    """The CUDA compute capability TensorFlow reports for ``gpu``; (0, 0) if it reports none."""
    return tuple(tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0)))


def with_policy(model: keras.Model, policy: str) -> keras.Model:
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
    """Set ``policy`` on a serialised layer, or float32 where ``with_policy`` keeps it."""
    if layer["class_name"] == "InputLayer":
        return
    inner = layer["config"].get("layer")
    if isinstance(inner, dict):
        inner["config"]["dtype"] = layer["config"]["dtype"] = "float32"
    else:
        layer["config"]["dtype"] = "float32" if layer["config"]["name"] == OUTPUT_LAYER else policy
