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

    def worker_rank(self) -> int | None:
        from shrinkflow.backends.torch.distributed import worker_rank

        return worker_rank()

    def launch_workers(self, argv: list[str], processes: int) -> None:
        from shrinkflow.backends.torch.distributed import launch

        launch(argv, processes)

    def train_model(self, cfg, model_name, data, out_dir, resume_dir, on_epoch, run_id):
        from shrinkflow.backends.torch.train import train_model

        return train_model(cfg, model_name, data, out_dir, resume_dir, on_epoch, run_id=run_id)

    def prunable_weights(self, model_dir: Path) -> int:
        from shrinkflow.backends.torch.artifact import load_model
        from shrinkflow.backends.torch.evaluate import count_params

        model, _ = load_model(model_dir)
        return int(count_params(model)["prunable_weights"])

    def resumable_prune_run_id(self, cfg, method, sparsity, model_dir, data, resume_dir):
        """Only gradual pruning re-trains (and resumes); the other methods take seconds."""
        if not method.startswith("gradual_"):
            return None
        from shrinkflow.backends.torch.prune_unstructured import gradual_fingerprint
        from shrinkflow.backends.torch.train import resumable_run_id

        fingerprint = gradual_fingerprint(cfg, method, sparsity, model_dir, data)
        return resumable_run_id(resume_dir, fingerprint)

    def prune_model(
        self,
        cfg,
        method,
        sparsity,
        model_dir,
        data,
        out_dir,
        resume_dir,
        on_epoch,
        run_id,
        sensitivity_dir,
    ) -> dict:
        if method.startswith("structured_"):
            from shrinkflow.backends.torch.prune_structured import prune_structured as prune
        else:
            from shrinkflow.backends.torch.prune_unstructured import prune_unstructured as prune
        return prune(
            cfg,
            method,
            sparsity,
            model_dir,
            data,
            out_dir,
            resume_dir,
            on_epoch,
            run_id,
            sensitivity_dir,
        )

    def finetune_fingerprint(self, cfg, model_dir, data) -> str:
        from shrinkflow.backends.torch.finetune import finetune_fingerprint

        return finetune_fingerprint(cfg, model_dir, data)

    def finetune_model(self, cfg, model_dir, data, out_dir, resume_dir, on_epoch, run_id):
        from shrinkflow.backends.torch.finetune import finetune_model

        return finetune_model(cfg, model_dir, data, out_dir, resume_dir, on_epoch, run_id)

    def analyze_sensitivity(self, cfg, model_dir, data, out_dir) -> dict:
        from shrinkflow.backends.torch.sensitivity import analyze_sensitivity

        return analyze_sensitivity(cfg, model_dir, data, out_dir)

    def resumable_quantize_run_id(self, cfg, method, model_dir, data, resume_dir):
        from shrinkflow.backends.torch.quantize import resumable_quantize_run_id

        return resumable_quantize_run_id(cfg, method, model_dir, data, resume_dir)

    def quantize_model(self, cfg, method, model_dir, data, out_dir, resume_dir, on_epoch, run_id):
        from shrinkflow.backends.torch.quantize import quantize_model

        return quantize_model(cfg, method, model_dir, data, out_dir, resume_dir, on_epoch, run_id)

    def evaluate_model(self, cfg, model_dir, data, reference_dir=None) -> dict:
        from shrinkflow.backends.torch.evaluate import evaluate_model

        return evaluate_model(cfg, model_dir, data, reference_dir)


BACKEND = _TorchBackend()
