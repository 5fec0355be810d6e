"""The GPU fast path of training (``train.precision``, ``train.compile``): what each setting
resolves to, that a CPU run is exactly the plain float32 SGD loop whatever they say, and on a
CUDA GPU (skipped elsewhere) that the step captured as a CUDA graph trains as the eager one,
resumes, and saves a plain model."""

import contextlib
import math
from pathlib import Path

import pytest
import torch
from data_fixtures import digits_data
from torch import nn
from torch_fixtures import fixed_threads, with_train  # noqa: F401 (an autouse fixture)

from shrinkflow.backends.torch import device as torch_device
from shrinkflow.backends.torch.augment import Augment
from shrinkflow.backends.torch.device import deterministic_on_cpu, fast_path
from shrinkflow.backends.torch.models import create_model
from shrinkflow.backends.torch.optim import lr_scheduler, sgd
from shrinkflow.backends.torch.tensors import to_device_tensors
from shrinkflow.backends.torch.trainer import Trainer
from shrinkflow.config import load_params
from shrinkflow.errors import ShrinkflowError
from shrinkflow.training import TrainPlan, train_batches
from shrinkflow.training.fast_path import FastPath, resolve, without_fast_path
from shrinkflow.training.loop import train_in_memory

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SMALL = slice(540, 700)  # 160 training images: 5 batches of 32 per epoch


def train(precision="auto", compile="auto", mixed_precision=False) -> dict:  # noqa: A002
    return {"precision": precision, "compile": compile, "mixed_precision": mixed_precision}


# --- what the keys resolve to (no framework) -------------------------------------------------


@pytest.mark.parametrize(
    ("t", "gpu", "bfloat16", "expected"),
    [
        (train(), False, False, FastPath("float32", False)),  # CPU: unchanged
        (train(), True, True, FastPath("bfloat16", True)),  # Ampere and later
        (train(), True, False, FastPath("float32", True)),  # older GPUs: never float16 unasked
        (train("float16"), True, False, FastPath("float16", True)),
        (train(compile=False), True, True, FastPath("bfloat16", False)),
        (train("float32"), True, True, FastPath("float32", True)),
        (train(mixed_precision=True), True, True, FastPath("float16", True)),  # the old key
    ],
)
def test_precision_and_compile_resolve_per_device(t, gpu, bfloat16, expected):
    assert resolve(t, gpu=gpu, bfloat16=bfloat16, compile_on_cpu=False) == expected


def test_a_cpu_run_ignores_reduced_precision_and_says_so(capsys):
    path = resolve(train("bfloat16", True), gpu=False, bfloat16=False, compile_on_cpu=False)
    assert path == FastPath("float32", False)
    err = capsys.readouterr().err
    assert "train.precision: ignored on CPU" in err and "train.compile: ignored on CPU" in err
    # A backend that compiles on CPU (TensorFlow's XLA) does so when asked, never by default.
    assert resolve(train(compile=True), gpu=False, bfloat16=False, compile_on_cpu=True).compile
    assert not resolve(train(), gpu=False, bfloat16=False, compile_on_cpu=True).compile


@pytest.mark.parametrize(
    ("t", "bfloat16", "message"),
    [
        (train("bfloat16"), False, "train.precision: bfloat16 needs a GPU that computes in it"),
        (train("bfloat16", mixed_precision=True), True, "train.mixed_precision: true asks for"),
        (train("half"), True, "train.precision: 'half' is not one of auto, float32, bfloat16"),
        (train(compile="yes"), True, "train.compile: 'yes' is not auto, true or false"),
    ],
)
def test_contradictions_are_one_line_errors(t, bfloat16, message):
    with pytest.raises(ShrinkflowError, match=message):
        resolve(t, gpu=True, bfloat16=bfloat16, compile_on_cpu=False)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.precision=half", "train.precision"),
        ("train.compile=maybe", "train.compile"),
    ],
)
def test_the_schema_names_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ShrinkflowError, match=message) as caught:
        load_params([PARAMS], [override])
    assert "\n" not in str(caught.value)


def test_the_defaults_are_auto_and_the_old_key_still_validates():
    cfg = load_params([PARAMS], ["train.mixed_precision=true", "train.compile=false"])
    assert cfg["train"]["precision"] == "auto" and cfg["train"]["compile"] is False
    assert load_params([PARAMS])["train"]["compile"] == "auto"


def test_without_fast_path_is_a_copy_in_float32_uncompiled(capsys):
    cfg = {"seed": 0, "train": {**train("bfloat16", True), "lr": 0.1}}
    plain = without_fast_path(cfg, "quantize qat_int8", "fake quantization")
    assert plain["train"] == {**train("float32", False), "lr": 0.1}
    assert cfg["train"]["precision"] == "bfloat16"  # the caller's params are not changed
    assert "train.precision, train.compile ignored (fake quantization)" in capsys.readouterr().err


# --- torch: the rules only a GPU run meets -----------------------------------------------------


@pytest.mark.parametrize(
    ("t", "world", "said"),
    [
        (train("float16"), 1, "train.compile: off under float16"),
        (train(), 2, "train.compile: off in data-parallel training"),
    ],
)
def test_torch_steps_eagerly_where_a_graph_cannot_capture(t, world, said, monkeypatch, capsys):
    monkeypatch.setattr(torch_device.torch.cuda, "get_device_capability", lambda dev: (9, 0))
    path = fast_path(t, torch.device("cuda"), world)
    assert not path.compile and said in capsys.readouterr().err


# --- torch on CPU: exactly the plain loop ------------------------------------------------------


def plain_sgd_epoch(cfg: dict, data) -> dict[str, torch.Tensor]:
    """One epoch of the float32 SGD loop as it was before the fast path existed, written out:
    the weights ``Trainer`` must reproduce bit for bit on CPU."""
    t, cpu = cfg["train"], torch.device("cpu")
    torch.manual_seed(cfg["seed"])
    model = create_model("resnet20", 10, 1, 8)
    x, y = to_device_tensors(data, "train", cpu)
    bounds = train_batches(int(t["batch_size"]), len(y), 1)
    optimizer = sgd(model, t, float(t["lr"]))
    scheduler = lr_scheduler(optimizer, t["schedule"], 0, len(bounds))
    augment = Augment.of(t, data.image_size, data.mean, data.std, cpu)
    order, shifts, flips = augment.draw(len(y), torch.Generator().manual_seed(cfg["seed"]), cpu)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=float(t["label_smoothing"]))
    model.train()
    with deterministic_on_cpu(cpu):
        for start, stop in bounds:
            idx = order[start:stop]
            loss = loss_fn(model(augment(x[idx], shifts[idx], flips[idx])), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.state_dict()


def trainer_epoch(cfg: dict, data, dev: str = "cpu") -> Trainer:
    """One epoch of ``Trainer`` (what ``fit`` runs) on a fresh ResNet-20 seeded as above."""
    torch.manual_seed(cfg["seed"])
    model = create_model("resnet20", 10, 1, 8)
    device = torch.device(dev)
    plan = TrainPlan(int(cfg["train"]["epochs"]), float(cfg["train"]["lr"]), 0, "train.lr")
    run = Trainer.build(model, cfg, data, plan, device)
    with deterministic_on_cpu(device):
        train_in_memory(run, int(cfg["train"]["epochs"]))
    return run


@pytest.fixture(scope="module")
def small():
    return digits_data(SMALL)


@pytest.fixture(scope="module")
def plain_weights(small):
    return plain_sgd_epoch(with_train(epochs=1), small)


@pytest.mark.parametrize(
    "keys",
    [
        {},  # the defaults: auto, auto
        {"precision": "float32", "compile": False},  # the fast path explicitly off
        {"precision": "bfloat16", "compile": True},  # asked for, and ignored on CPU
        {"mixed_precision": True},
    ],
)
def test_a_cpu_run_is_the_plain_float32_loop_bit_for_bit(keys, small, plain_weights):
    run = trainer_epoch(with_train(epochs=1, **keys), small)
    assert run.amp_dtype is None and run.graph is None and not run.scaler.is_enabled()
    weights = run.model.state_dict()
    assert weights.keys() == plain_weights.keys()
    for key, value in weights.items():
        assert torch.equal(value, plain_weights[key]), key


# --- torch on CUDA: the captured step ------------------------------------------------------------


def assert_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        # GPU kernels sum in varying order and the graph convolves channels-last: close, not
        # bit-equal. A skipped step or a stale learning rate moves weights by percents.
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-2, atol=1e-3), (what, key)


@CUDA
def test_the_cuda_graph_trains_as_the_eager_step(small):
    """Two epochs in float32: the graph replays full batches, the last smaller batch of each
    epoch (none at 160 = 5 x 32; see the next test) runs eagerly, and both reach the eager
    run's weights."""
    cfg = with_train(epochs=2, precision="float32", augment=True)
    graph = trainer_epoch({**cfg, "train": {**cfg["train"], "compile": True}}, small, "cuda")
    eager = trainer_epoch({**cfg, "train": {**cfg["train"], "compile": False}}, small, "cuda")
    assert graph.graph is not None and graph.graph.graph is not None  # it was captured
    assert eager.graph is None
    assert graph.scheduler.last_epoch == eager.scheduler.last_epoch == 2 * len(graph.bounds)
    assert_close(graph.model.state_dict(), eager.model.state_dict(), "weights")
    # Plain state: float learning rates, the module's own keys, NCHW weights.
    state = graph.snapshot()
    assert all(isinstance(g["lr"], float) for g in state["optimizer"]["param_groups"])
    assert state["model"].keys() == eager.model.state_dict().keys()
    assert all(p.is_contiguous() for p in graph.model.parameters())


@CUDA
def test_a_partial_last_batch_runs_eagerly_beside_the_graph():
    data = digits_data(slice(540, 701))  # 161 images: 4 batches of 32 and one of 33
    cfg = with_train(epochs=2, precision="float32", compile=True)
    run = trainer_epoch(cfg, data, "cuda")
    assert run.graph.graph is not None
    assert run.scheduler.last_epoch == 2 * len(run.bounds) == 10
    eager = trainer_epoch(with_train(epochs=2, precision="float32", compile=False), data, "cuda")
    assert_close(run.model.state_dict(), eager.model.state_dict(), "weights")


@CUDA
def test_a_compiled_run_resumes_from_its_state(small):
    """Epoch 1, the state saved and restored into a fresh run, epoch 2: as two epochs at once."""
    cfg = with_train(epochs=2, compile=True)
    whole = trainer_epoch(cfg, small, "cuda")
    torch.manual_seed(cfg["seed"])
    plan = TrainPlan(2, float(cfg["train"]["lr"]), 0, "train.lr")
    first = Trainer.build(
        create_model("resnet20", 10, 1, 8), cfg, small, plan, torch.device("cuda")
    )
    first.train_epoch(1, "epoch 1/2")
    state = first.snapshot()
    second = Trainer.build(
        create_model("resnet20", 10, 1, 8), cfg, small, plan, torch.device("cuda")
    )
    second.restore(state)
    second.train_epoch(2, "epoch 2/2")
    assert_close(second.model.state_dict(), whole.model.state_dict(), "resumed weights")


@CUDA
def test_a_step_hook_acts_on_the_weights_the_graph_replays(small):
    """Gradual pruning's and fine-tuning's masks are applied in place after every step: the
    replays must train the masked weights, and every step must call the hook."""
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 1, 8)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    keep = torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    steps = []

    def hook(step: int) -> None:
        steps.append(step)
        with torch.no_grad():
            conv.weight.masked_fill_(~keep.to(conv.weight.device), 0.0)

    cfg = with_train(epochs=2, compile=True)
    plan = TrainPlan(2, float(cfg["train"]["lr"]), 0, "train.lr")
    run = Trainer.build(model, cfg, small, plan, torch.device("cuda"), step_hook=hook)
    train_in_memory(run, 2)
    assert run.graph.graph is not None
    assert steps == list(range(1, 2 * len(run.bounds) + 1))
    weight = conv.weight.detach().cpu()
    assert (weight[~keep] == 0).all() and (weight[keep] != 0).all()


@CUDA
def test_the_default_on_a_gpu_is_the_fast_path(small):
    run = trainer_epoch(with_train(epochs=1), small, "cuda")
    bfloat16 = torch.cuda.get_device_capability() >= (8, 0)
    assert run.amp_dtype == (torch.bfloat16 if bfloat16 else None)
    assert run.graph is not None and run.graph.graph is not None
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


# --- TensorFlow: the same keys -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf_side():
    """TensorFlow's trainer, imported after torch (one process loads both here)."""
    tf_fixtures = pytest.importorskip("tf_fixtures")
    tf_fixtures.one_thread()
    # On a GPU, TensorFlow would otherwise take the memory torch's tests in this process need.
    for gpu in tf_fixtures.tf.config.list_physical_devices("GPU"):
        with contextlib.suppress(RuntimeError):  # its runtime started already
            tf_fixtures.tf.config.experimental.set_memory_growth(gpu, True)
    from shrinkflow.backends.tensorflow import device, models, trainer

    return tf_fixtures, models, trainer, device


def tf_trainer(tf_side, tmp_path, **keys):
    """A TensorFlow ``Trainer`` (compiled, not trained) of a fresh 8x8 ResNet-20."""
    tf_fixtures, models, trainer, _ = tf_side
    data = digits_data(SMALL)
    model = models.create_model("resnet20", 10, 1, 8, data.mean, data.std)
    cfg = tf_fixtures.with_train(epochs=1, **keys)
    plan = TrainPlan(1, float(cfg["train"]["lr"]), 0, "train.lr")
    return trainer.Trainer(model, cfg, data, plan, tmp_path, [], None, lambda m: None)


def test_a_tensorflow_cpu_run_is_unchanged_and_compiles_only_when_asked(tf_side, tmp_path):
    if tf_side[0].tf.config.list_physical_devices("GPU"):
        pytest.skip("checks the CPU's defaults")
    for keys in ({}, {"precision": "bfloat16"}):
        run = tf_trainer(tf_side, tmp_path, **keys)
        # No float16/bfloat16 twin, no loss scaling, no XLA: the model.fit of before.
        assert run.trained is run.model and not run.trained.jit_compile
        assert type(run.trained.optimizer).__name__ == "TorchSGD"
    assert tf_trainer(tf_side, tmp_path, compile=True).trained.jit_compile is True


def test_a_tensorflow_gpu_run_takes_the_fast_path_and_saves_float32(tf_side, tmp_path):
    tf_fixtures, _, _, device = tf_side
    gpus = tf_fixtures.tf.config.list_physical_devices("GPU")
    if not gpus:
        pytest.skip("needs a GPU")
    run = tf_trainer(tf_side, tmp_path)
    bfloat16 = all(device.compute_capability(g) >= (8, 0) for g in gpus)
    policy = "mixed_bfloat16" if bfloat16 else "float32"
    assert run.trained.jit_compile is True
    assert run.trained.get_layer("layer1_0_conv1").dtype_policy.name == policy
    metrics = run.train_epoch(1, "epoch 1/1")
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])
    run.save_model()
    assert {layer.dtype_policy.name for layer in run.model.layers} == {"float32"}
