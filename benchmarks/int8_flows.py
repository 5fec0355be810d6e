"""Which int8 flow gives real int8 kernels and real int8 files on this torch: the measurements.

Run from the project root inside the virtualenv:

    python benchmarks/int8_flows.py [--models resnet20 resnet18] [--threads 2]

For each model (random weights: speed and size do not depend on the values; 3x32x32 input,
10 classes) it quantizes the same float model with every candidate flow and prints, side by
side in one process, the one-off set-up time, batch-1 latency, batch-64 time and the file size:

- float eager: the reference;
- PT2E reference graph: torchao's ``convert_pt2e`` output run as it is (quantize/dequantize
  nodes around float operators: an int8 file, but float arithmetic plus conversions);
- PT2E + oneDNN lowering: ``lower_pt2e_quantized_to_x86``, what shrinkflow evaluates;
- PT2E + torch.compile: Inductor with freezing, which reaches the same oneDNN kernels after a
  C++ compilation;
- FX + TorchScript: ``torch.ao.quantization.quantize_fx`` on the fbgemm/x86 engine, saved with
  ``torch.jit.save``: real int8 kernels too, but both APIs are deprecated in this torch.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from figures import recorded

from shrinkflow.backends.torch import pt2e, pt2e_archive
from shrinkflow.backends.torch.artifact import save_model
from shrinkflow.backends.torch.models import create_model
from shrinkflow.measure import time_interleaved

SPEC = {
    "in_channels": 3,
    "image_size": 32,
    "num_classes": 10,
    "mean": [0.5] * 3,
    "std": [0.25] * 3,
    "classes": [str(i) for i in range(10)],
}
CALIBRATION = [torch.randn(32, 3, 32, 32) for _ in range(4)]


def medians_ms(forwards: list, x: torch.Tensor, repeats: int) -> list[float]:
    """Median ms per forward, the forwards taking turns call by call (a busy machine slows
    them alike, so their ratios hold)."""
    with torch.no_grad():
        seconds = time_interleaved([lambda f=f: f(x) for f in forwards], 3, repeats)
    return [sorted(s)[len(s) // 2] * 1e3 for s in seconds]


def timed(make: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    value = make()
    return value, time.perf_counter() - start


def pt2e_program(model: torch.nn.Module, spec: dict, folder: Path):
    prepared = pt2e.prepare(copy.deepcopy(model), spec, "static")
    pt2e.calibrate(prepared, CALIBRATION)
    converted = pt2e.convert(prepared)
    path = pt2e_archive.save(converted, spec, folder)
    return pt2e_archive.load(folder)[0], path.stat().st_size


def fx_torchscript(model: torch.nn.Module, folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation warnings are the point of the row
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        prepared = prepare_fx(
            copy.deepcopy(model), get_default_qconfig_mapping("x86"), (CALIBRATION[0],)
        )
        with torch.no_grad():
            for x in CALIBRATION:
                prepared(x)
        scripted = torch.jit.script(convert_fx(prepared))
        path = folder / "model.ts"
        torch.jit.save(scripted, str(path))
        return torch.jit.load(str(path)), path.stat().st_size


def compiled(module: torch.nn.Module, x1: torch.Tensor, x64: torch.Tensor):
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    forward = torch.compile(module)
    with torch.no_grad():
        forward(x1)
        forward(x64)
    return forward


def flows(name: str, folder: Path, x1: torch.Tensor, x64: torch.Tensor) -> list[tuple]:
    """(flow, set-up seconds, batch-1 forward, batch-64 forward, file bytes) per flow."""
    torch.manual_seed(0)
    model = create_model(name, 10, 3, 32).eval()
    spec = {**SPEC, "arch": name}
    rows = [("float eager", 0.0, model, model, save_model(model, spec, folder).stat().st_size)]
    (program, size), seconds = timed(lambda: pt2e_program(model, spec, folder))
    reference = program.module()
    rows.append(("PT2E reference graph", seconds, reference, reference, size))
    (low1, low64), seconds = timed(
        lambda: (pt2e.lower(program, spec, 1), pt2e.lower(program, spec, 64))
    )
    rows.append(("PT2E + oneDNN lowering", seconds, low1, low64, size))
    forward, seconds = timed(lambda: compiled(reference, x1, x64))
    rows.append(("PT2E + torch.compile", seconds, forward, forward, size))
    (script, ts_size), seconds = timed(lambda: fx_torchscript(model, folder))
    rows.append(("FX + TorchScript (depr.)", seconds, script, script, ts_size))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet18"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x1, x64 = torch.randn(1, 3, 32, 32), torch.randn(64, 3, 32, 32)
    print(f"torch {torch.__version__}, {args.threads} thread(s); times are medians")
    header = (
        f"{'flow':<26}{'set-up s':>10}{'b1 ms':>9}{'x float':>9}{'b64 ms':>9}{'x float':>9}"
        f"{'file KB':>10}{'x float':>9}"
    )
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            rows = flows(name, Path(tmp), x1, x64)
        b1 = medians_ms([row[2] for row in rows], x1, args.repeats)
        b64 = medians_ms([row[3] for row in rows], x64, max(3, args.repeats // 2))
        params = sum(p.numel() for p in rows[0][2].parameters())
        print(f"\n{name} ({params / 1e6:.2f} M params)")
        print(header)
        for (flow, setup, _, _, size), t1, t64 in zip(rows, b1, b64, strict=True):
            print(
                f"{flow:<26}{setup:>10.1f}{t1:>9.2f}{t1 / b1[0]:>9.2f}{t64:>9.1f}"
                f"{t64 / b64[0]:>9.2f}{size / 1e3:>10.0f}{size / rows[0][4]:>9.2f}"
            )


if __name__ == "__main__":
    with recorded("int8-flows"):
        main()
