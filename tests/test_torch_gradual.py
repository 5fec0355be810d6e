"""Gradual magnitude pruning (PyTorch): the schedules, the step hook and the prune stage."""

import math

import pytest
import torch
from data_fixtures import digits_data
from torch_prune_fixtures import (  # noqa: F401 (fixed_threads: an autouse fixture)
    PRUNE_CFG,
    conv_linear_weights,
    fixed_threads,
    saved_weights,
    with_gradual,
)

from shrinkflow.backends.base import JobContext
from shrinkflow.backends.torch.artifact import load_model
from shrinkflow.backends.torch.gradual import (
    GradualPruner,
    constant_sparsity,
    polynomial_sparsity,
    prune_gradually,
    schedule_steps,
)
from shrinkflow.backends.torch.models import create_model
from shrinkflow.backends.torch.prune_unstructured import prunable_modules
from shrinkflow.backends.torch.train import fit
from shrinkflow.errors import ShrinkflowError
from shrinkflow.training import steps_per_epoch

GRADUAL = PRUNE_CFG["prune"]["gradual"]


@pytest.fixture(scope="module")
def baseline(torch_digits_baseline):
    """conftest's trained resnet20 and its data (read only)."""
    return torch_digits_baseline


def test_polynomial_schedule_by_hand():
    # begin 10, end 110, s_i 0.2, s_f 0.8: s_t = 0.8 - 0.6 (1 - (t - 10) / 100)^3
    assert polynomial_sparsity(9, 10, 110, 0.2, 0.8) == 0.0  # not pruning yet
    assert polynomial_sparsity(10, 10, 110, 0.2, 0.8) == pytest.approx(0.2)
    assert polynomial_sparsity(60, 10, 110, 0.2, 0.8) == pytest.approx(0.8 - 0.6 / 8)
    assert polynomial_sparsity(85, 10, 110, 0.2, 0.8) == pytest.approx(0.8 - 0.6 / 64)
    assert polynomial_sparsity(110, 10, 110, 0.2, 0.8) == pytest.approx(0.8)
    assert polynomial_sparsity(500, 10, 110, 0.2, 0.8) == 0.8
    values = [polynomial_sparsity(t, 10, 110, 0.0, 0.8) for t in range(10, 111)]
    steps = [b - a for a, b in zip(values, values[1:], strict=False)]
    assert values[0] == 0.0 and all(s > 0 for s in steps)
    assert steps == sorted(steps, reverse=True)  # fast first, slow near the target
    assert polynomial_sparsity(5, 5, 5, 0.0, 0.6) == 0.6  # begin == end: straight to s_f


def test_constant_schedule():
    assert constant_sparsity(9, 10, 0.7) == 0.0
    assert constant_sparsity(10, 10, 0.7) == constant_sparsity(1000, 10, 0.7) == 0.7


def test_schedule_steps_from_fractions():
    assert schedule_steps(100, 0.0, 0.7) == (1, 70)  # the first update follows the first step
    assert schedule_steps(100, 0.25, 1.0) == (25, 100)
    assert schedule_steps(3, 0.0, 0.1) == (1, 1)
    with pytest.raises(ShrinkflowError, match=r"^prune.gradual.begin_fraction: 0.7 is not below"):
        schedule_steps(100, 0.7, 0.7)


def fake_training(pruner: GradualPruner, model, total: int) -> list[tuple[int, float]]:
    """Move every weight between hook calls as an optimizer would (momentum revives pruned
    weights); return (step, sparsity) after every step, checking that pruned weights stay 0."""
    generator = torch.Generator().manual_seed(0)
    layers = dict(pruner.modules)
    seen = []
    for step in range(1, total + 1):
        with torch.no_grad():
            for module in layers.values():
                module.weight.add_(1e-3 * torch.randn(module.weight.shape, generator=generator))
        pruner(step)
        if pruner.masks is not None:
            for name, keep in pruner.masks.items():
                assert not layers[name].weight[~keep].any(), (step, name)
        zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
        seen.append((step, zeros / sum(m.weight.numel() for m in layers.values())))
    return seen


def test_pruner_follows_the_schedule_and_ends_exactly_at_the_target():
    torch.manual_seed(0)
    model = create_model("resnet20", 10, in_channels=1, image_size=8)
    total = 30
    pruner = GradualPruner(
        model, "polynomial", 0.8, total, {**GRADUAL, "frequency": 4}, "global", ["output"]
    )
    assert (pruner.begin, pruner.end) == (1, 21)
    updates = [s for s in range(1, total + 1) if pruner.is_update(s)]
    assert updates == [1, 5, 9, 13, 17, 21]
    seen = dict(fake_training(pruner, model, total))
    n = sum(m.weight.numel() for _, m in pruner.modules)
    for step in updates:
        scheduled = polynomial_sparsity(step, 1, 21, 0.0, 0.8)
        assert seen[step] == pytest.approx(round(scheduled * n) / n, abs=1e-12), step
    assert seen[21] == seen[30] == round(0.8 * n) / n  # exactly the target, and held
    assert list(seen.values()) == sorted(seen.values())  # the masks only grow
    assert torch.count_nonzero(model.fc.weight) == model.fc.weight.numel()


def test_frequency_beyond_the_run_still_reaches_the_target():
    torch.manual_seed(0)
    model = create_model("resnet20", 10, in_channels=1, image_size=8)
    pruner = GradualPruner(
        model, "polynomial", 0.6, 20, {**GRADUAL, "frequency": 1000}, "layer", ["output"]
    )
    assert [s for s in range(1, 21) if pruner.is_update(s)] == [1, 14]
    seen = fake_training(pruner, model, 20)
    assert seen[0][1] == 0.0  # s_i = 0 at the first update
    assert seen[-1][1] == pytest.approx(0.6, abs=1e-4) and pruner.sparsity == 0.6


def test_constant_pruner_prunes_to_the_target_at_begin():
    torch.manual_seed(0)
    model = create_model("resnet20", 10, in_channels=1, image_size=8)
    pruner = GradualPruner(
        model, "constant", 0.5, 40, {**GRADUAL, "begin_fraction": 0.25}, "global", ["output"]
    )
    seen = dict(fake_training(pruner, model, 40))
    assert seen[9] == 0.0 and seen[10] == pytest.approx(0.5, abs=1e-5) == seen[40]


def test_bad_schedule_settings_are_named():
    model = create_model("resnet20", 10, in_channels=1, image_size=8)
    with pytest.raises(ShrinkflowError, match=r"^prune.gradual.initial_sparsity: 0.5 is above"):
        GradualPruner(
            model, "polynomial", 0.3, 10, {**GRADUAL, "initial_sparsity": 0.5}, "global", []
        )
    with pytest.raises(ShrinkflowError, match=r"^prune.sparsities: 1.0 is not in"):
        GradualPruner(model, "constant", 1.0, 10, GRADUAL, "global", [])


@pytest.mark.parametrize("method", ["gradual_polynomial", "gradual_constant"])
def test_gradual_prune_stage_saves_the_target_sparsity(baseline, tmp_path, method):
    model_dir, data = baseline
    out = tmp_path / "out"
    out.mkdir()
    epochs = []
    facts = prune_gradually(
        PRUNE_CFG,
        method,
        0.7,
        model_dir,
        data,
        JobContext(out, tmp_path / "r", lambda e, m: epochs.append((e, m)), "run-3"),
        None,
    )
    state = saved_weights(out)
    assert not any(k.endswith(("_orig", "_mask")) for k in state)
    weights = {k: v for k, v in conv_linear_weights(out).items() if k != "fc.weight"}
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == round(0.7 * total) and facts["measured_sparsity"] == zeros / total
    # end = 0.7 of 2 x 40 steps = step 56, in epoch 2: epoch 1 may not be the saved one.
    assert steps_per_epoch(PRUNE_CFG, data) == 40
    assert facts["epochs"] == 2 and facts["best_epoch"] == 2
    assert [e for e, _ in epochs] == [1, 2] and epochs[-1][1]["sparsity"] == 0.7
    if method == "gradual_polynomial":
        assert 0 < epochs[0][1]["sparsity"] < 0.7
    else:
        assert epochs[0][1]["sparsity"] == 0.7
    # Re-training recovers what one-shot pruning to 70 % loses (measured: 0.88 vs 0.33).
    assert facts["val_top1"] > 0.7


def test_hook_state_resumes_to_the_uninterrupted_weights(baseline, tmp_path):
    """A job killed after epoch 1 resumes with the pruner's masks and the step count intact."""
    data = digits_data(train=slice(540, 840))  # 300 images: 10 steps per epoch
    cfg = with_gradual(frequency=4)

    class Recording(GradualPruner):
        def __init__(self, *args):
            super().__init__(*args)
            self.steps = []

        def __call__(self, step):
            self.steps.append(step)
            super().__call__(step)

    def run(name: str, stop_at_epoch: int = 0) -> Recording:
        model, spec = load_model(baseline[0])
        pruner = Recording(
            model, "polynomial", 0.8, 30, cfg["prune"]["gradual"], "global", ["output"]
        )

        def on_epoch(epoch, metrics):
            if epoch == stop_at_epoch:
                raise KeyboardInterrupt  # before the epoch's resume state is written

        (tmp_path / name).mkdir(exist_ok=True)
        fit(
            model,
            cfg,
            data,
            epochs=3,
            lr=0.01,
            warmup_epochs=0,
            out_dir=tmp_path / name,
            resume_dir=tmp_path / f"{name}-resume",
            fingerprint="f",
            on_epoch=on_epoch,
            run_id=None,
            spec=spec,
            step_hook=pruner,
            select_from_epoch=3,
            device="cpu",
        )
        return pruner

    whole = run("whole")
    assert whole.steps == list(range(1, 31)) and whole.end == 21
    with pytest.raises(KeyboardInterrupt):
        run("killed", stop_at_epoch=2)
    resumed = run("killed")
    assert resumed.steps == list(range(11, 31))
    a, b = saved_weights(tmp_path / "whole"), saved_weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    names = [n for n, _ in prunable_modules(load_model(tmp_path / "whole")[0], ["output"])]
    zeros = sum(int((a[f"{n}.weight"] == 0).sum()) for n in names)
    assert zeros == round(0.8 * sum(a[f"{n}.weight"].numel() for n in names))
    assert math.isclose(resumed.sparsity, 0.8)
