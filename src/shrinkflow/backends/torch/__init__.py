"""The PyTorch backend. Submodules (and torch itself) are imported only when a method runs."""

from __future__ import annotations

from pathlib import Path


class _TorchBackend:
    name = "torch"

    def list_models(self) -> list[str]:
        from shrinkflow.backends.torch.models import list_models

        return list_models()

    def count_params(self, model_name: str) -> int:
        from shrinkflow.backends.torch.models import create_model

        model = create_model(model_name, num_classes=10, in_channels=3, image_size=32)
        return sum(p.numel() for p in model.parameters())

    def train_fingerprint(self, cfg, model_name, data) -> str:
        from shrinkflow.backends.torch.train import train_fingerprint

        return train_fingerprint(cfg, model_name, data)

    def resumable_run_id(self, resume_dir: Path, fingerprint: str) -> str | None:
        from shrinkflow.backends.torch.train import resumable_run_id

        return resumable_run_id(resume_dir, fingerprint)

    def train_model(self, cfg, model_name, data, out_dir, resume_dir, on_epoch, run_id):
        from shrinkflow.backends.torch.train import train_model

        return train_model(cfg, model_name, data, out_dir, resume_dir, on_epoch, run_id=run_id)

    def evaluate_model(self, cfg, model_dir, data) -> dict:
        from shrinkflow.backends.torch.evaluate import evaluate_model

        return evaluate_model(cfg, model_dir, data)


BACKEND = _TorchBackend()
