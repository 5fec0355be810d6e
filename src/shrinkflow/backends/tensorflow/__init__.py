"""The TensorFlow backend (tf-keras, tensorflow-model-optimization, TFLite).

Submodules (and TensorFlow itself, ~10 s to import) are imported only when a method runs, so a
torch job never pays for them. Every submodule sets ``TF_USE_LEGACY_KERAS=1`` before importing
TensorFlow: tfmot's pruning wrappers need Keras 2 (the ``tf_keras`` package).
"""

from __future__ import annotations

from pathlib import Path


class _TensorFlowBackend:
    name = "tensorflow"

    def list_models(self) -> list[str]:
        from shrinkflow.backends.tensorflow.models import list_models

        return list_models()

    def count_params(self, model_name: str) -> int:
        """Trainable parameters, as torch counts them (no batch-norm statistics)."""
        from shrinkflow.backends.tensorflow.models import create_model
        from shrinkflow.backends.tensorflow.weights import count_params

        model = create_model(model_name, num_classes=10, in_channels=3)
        return int(count_params(model)["params"])

    def train_fingerprint(self, cfg, model_name, data) -> str:
        from shrinkflow.backends.tensorflow.train import train_fingerprint

        return train_fingerprint(cfg, model_name, data)

    def resumable_run_id(self, resume_dir: Path, fingerprint: str) -> str | None:
        from shrinkflow.backends.tensorflow.train import resumable_run_id

        return resumable_run_id(resume_dir, fingerprint)

    def worker_rank(self) -> int | None:
        from shrinkflow.backends.tensorflow.distributed import worker_rank

        return worker_rank()

    def launch_workers(self, argv: list[str], processes: int) -> None:
        from shrinkflow.backends.tensorflow.distributed import launch

        launch(argv, processes)

    def train_model(self, cfg, model_name, data, out_dir, resume_dir, on_epoch, run_id):
        from shrinkflow.backends.tensorflow.train import train_model

        return train_model(cfg, model_name, data, out_dir, resume_dir, on_epoch, run_id=run_id)

    def prunable_weights(self, model_dir: Path) -> int:
        from shrinkflow.backends.tensorflow.artifact import load_model
        from shrinkflow.backends.tensorflow.weights import count_params

        model, _ = load_model(model_dir)
        return int(count_params(model)["prunable_weights"])

    def resumable_prune_run_id(self, cfg, method, sparsity, model_dir, data, resume_dir):
        """Only gradual pruning re-trains (and resumes); one-shot pruning takes seconds."""
        if not method.startswith("gradual_"):
            return None
        from shrinkflow.backends.tensorflow.prune import gradual_fingerprint
        from shrinkflow.backends.tensorflow.train import resumable_run_id

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
        from shrinkflow.backends.tensorflow.prune import prune_model

        return prune_model(
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
        from shrinkflow.backends.tensorflow.finetune import finetune_fingerprint

        return finetune_fingerprint(cfg, model_dir, data)

    def finetune_model(self, cfg, model_dir, data, out_dir, resume_dir, on_epoch, run_id):
        from shrinkflow.backends.tensorflow.finetune import finetune_model

        return finetune_model(cfg, model_dir, data, out_dir, resume_dir, on_epoch, run_id)

    def analyze_sensitivity(self, cfg, model_dir, data, out_dir) -> dict:
        from shrinkflow.backends.tensorflow.sensitivity import analyze_sensitivity

        return analyze_sensitivity(cfg, model_dir, data, out_dir)

    def resumable_quantize_run_id(self, cfg, method, model_dir, data, resume_dir):
        """Conversions take seconds and never re-train (there is no TensorFlow QAT here)."""
        return None

    def quantize_model(self, cfg, method, model_dir, data, out_dir, resume_dir, on_epoch, run_id):
        from shrinkflow.quantization import parse_quant_method

        parsed = parse_quant_method(method)
        if parsed.family == "fixed":
            from shrinkflow.backends.tensorflow.fixed_point import quantize_fixed

            return quantize_fixed(cfg, parsed.bits, model_dir, data, out_dir)
        from shrinkflow.backends.tensorflow.quantize import quantize_model

        return quantize_model(cfg, method, model_dir, data, out_dir, resume_dir, on_epoch, run_id)

    def evaluate_model(self, cfg, model_dir, data, reference_dir=None) -> dict:
        from shrinkflow.backends.tensorflow.evaluate import evaluate_model

        return evaluate_model(cfg, model_dir, data, reference_dir)


BACKEND = _TensorFlowBackend()
