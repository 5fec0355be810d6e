"""Fine-tuning a pruned model (PyTorch): zeros stay zero, accuracy recovers, epochs 0 copies."""

import copy

import pytest
import torch
from torch_prune_fixtures import (  # noqa: F401 (fixed_threads: an autouse fixture)
    PRUNE_CFG,
    conv_linear_weights,
    fixed_threads,
    saved_weights,
)

from shrinkflow.backends.base import JobContext
from shrinkflow.backends.torch.artifact import MODEL_FILE, load_model, save_model
from shrinkflow.backends.torch.finetune import finetune_fingerprint, finetune_model
from shrinkflow.backends.torch.prune_unstructured import (
    apply_masks,
    masks_from_zeros,
    prune_unstructured,
)
from shrinkflow.backends.torch.tensors import to_device_tensors
from shrinkflow.backends.torch.train import fit_in_memory


@pytest.fixture(scope="module")
def pruned(torch_digits_baseline, tmp_path_factory):
    """The baseline pruned one-shot to 70 %, with a few output-layer weights zeroed by hand:
    prune.exclude protects that layer, yet its zeros must survive fine-tuning too."""
    root = tmp_path_factory.mktemp("finetune")
    model_dir, data = torch_digits_baseline
    out = root / "pruned"
    out.mkdir()
    prune_unstructured(
        PRUNE_CFG, "l1_unstructured", 0.7, model_dir, data, JobContext(out, root / "r"), None
    )
    model, spec = load_model(out)
    x, y = to_device_tensors(data, "val", "cpu")
    with torch.no_grad():
        model.fc.weight[:, :3] = 0
        val_top1 = (model(x).argmax(1) == y).float().mean().item()
    save_model(model, spec, out)
    return out, data, val_top1


def finetune(pruned, tmp_path, cfg=PRUNE_CFG, name="out"):
    out = tmp_path / name
    out.mkdir()
    epochs = []
    result = finetune_model(
        cfg,
        pruned[0],
        pruned[1],
        JobContext(out, tmp_path / "resume", lambda e, m: epochs.append(e), "r-1"),
    )
    return out, result, epochs


def test_finetuning_keeps_every_zero_and_recovers_accuracy(pruned, tmp_path):
    out, result, epochs = finetune(pruned, tmp_path)
    before, after = conv_linear_weights(pruned[0]), conv_linear_weights(out)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key] == 0, after[key] == 0), key
    assert (before["fc.weight"][:, :3] == 0).all() and (after["fc.weight"][:, :3] == 0).all()
    kept = torch.cat([before[k][before[k] != 0] for k in before])
    trained = torch.cat([after[k][before[k] != 0] for k in before])
    assert not torch.equal(kept, trained)  # the surviving weights did train
    assert epochs == [1, 2] and result.epochs == 2 and result.resumed_from_epoch == 0
    # Measured: 0.33 right after pruning, 0.86 after two epochs.
    assert result.best_val_top1 > pruned[2] + 0.2
    assert not any(k.endswith(("_orig", "_mask")) for k in saved_weights(out))


def test_finished_finetuning_is_resumed_without_training(pruned, tmp_path):
    first, result, _ = finetune(pruned, tmp_path, name="first")
    again, resumed, epochs = finetune(pruned, tmp_path, name="again")
    assert epochs == [] and resumed.resumed_from_epoch == 2
    assert resumed.history == result.history
    a, b = saved_weights(first), saved_weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zero_epochs_copy_the_model(pruned, tmp_path):
    cfg = copy.deepcopy(PRUNE_CFG)
    cfg["finetune"]["epochs"] = 0
    out, result, epochs = finetune(pruned, tmp_path, cfg)
    assert (out / MODEL_FILE).read_bytes() == (pruned[0] / MODEL_FILE).read_bytes()
    assert epochs == [] and result.epochs == 0 and result.history == []
    assert result.best_val_top1 == pytest.approx(pruned[2])
    assert not (tmp_path / "resume").exists()


def test_fingerprint_follows_the_model_file_and_the_finetune_params(pruned, tmp_path):
    model_dir, data, _ = pruned
    fingerprint = finetune_fingerprint(PRUNE_CFG, model_dir, data)
    assert fingerprint == finetune_fingerprint(copy.deepcopy(PRUNE_CFG), model_dir, data)
    cfg = copy.deepcopy(PRUNE_CFG)
    cfg["finetune"]["lr"] = 0.02
    assert finetune_fingerprint(cfg, model_dir, data) != fingerprint
    other = tmp_path / "other"
    other.mkdir()
    model, spec = load_model(model_dir)
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] += 1
    save_model(model, spec, other)
    assert finetune_fingerprint(PRUNE_CFG, other, data) != fingerprint


def test_fit_in_memory_trains_in_place_and_writes_nothing(pruned, tmp_path, monkeypatch):
    """The between-rounds trainer of iterative pruning: no files, last epoch kept, hook called."""
    monkeypatch.chdir(tmp_path)
    model, _ = load_model(pruned[0])
    masks = masks_from_zeros(model, [])
    steps = []

    def hook(step):
        steps.append(step)
        apply_masks(model, masks)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    same = fit_in_memory(model, PRUNE_CFG, pruned[1], epochs=0, lr=0.01, device="cpu")
    assert same is model and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    trained = fit_in_memory(
        model, PRUNE_CFG, pruned[1], epochs=2, lr=0.01, step_hook=hook, device="cpu"
    )
    assert trained is model and not model.training
    assert steps == list(range(1, 81))  # 40 steps per epoch, counted over the whole run
    assert list(tmp_path.iterdir()) == []
    x, y = to_device_tensors(pruned[1], "val", "cpu")
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean().item() > pruned[2] + 0.2
    for name, keep in masks.items():
        assert not dict(model.named_modules())[name].weight[~keep].any(), name
