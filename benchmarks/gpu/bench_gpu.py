"""The GPU workstation check: dense maps through PyTorch on CUDA, one JSON of figures.

Run by ``benchmarks/gpu/run.sh`` on a lent GPU machine in one call (it must finish in
about 8 minutes), or here on the CPU as a smoke test (``--device cpu --quick``).
Speed does not depend on the weights, so the model is a randomly initialized VGG-16-BN
with dense graphs made without adapting (as ``benchmarks/conftest.py`` does).

Figures written (``--out``):

- ``dense``: for each frame side (512, 2048, 8192) and stride (16, 32) and precision
  (bf16, fp16): milliseconds from a frame in host memory to the per-window arrays
  (``map_arrays``) and to regions (``Detector.map`` + ``regions()``), median of repeats;
- ``per_window``: windows per second of the per-window network, batches of 1024;
- ``live``: the live detector's p50/p99 latency at 512², stride 16;
- ``training_epoch_s``: one training epoch on synthetic patches;
- ``agreement``: window-label agreement of the GPU path with the CPU FP32 path;
- ``tensorrt``: whether TensorRT was importable (its engines are not built here).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from defectscope.engines.loader import load_engine
from defectscope.engines.tensorrt import tensorrt_available
from defectscope.engines.torch_dense import TorchDenseEngine
from defectscope.export.dense import make_dense
from defectscope.io.files import atomic_write_json
from defectscope.maps.detector import Detector
from defectscope.maps.options import MapOptions
from defectscope.nets.checkpoint import ModelConfig, save_checkpoint
from defectscope.nets.vgg import build_model
from defectscope.service.live import LiveDetector
from defectscope.simulate.lattice import lattice_image
from defectscope.util.system import cpu_description

CLASSES = ("Bulk", "LC", "SF1", "SF2", "Twin_Bound", "Vacancy_CdTe", "interstitial")


def make_model(directory: Path) -> Path:
    """A random VGG-16-BN model directory with dense graphs at native strides 16 and 32."""
    model = build_model(len(CLASSES), architecture="vgg16_bn").eval()
    save_checkpoint(
        directory, model, ModelConfig(CLASSES, architecture="vgg16_bn", background_class="Bulk")
    )
    frames = [frame(512, seed) for seed in (1, 2)]
    make_dense(directory, frames, check_frames=[], native_strides=(16, 32), steps=0,
               int8=False, progress=False)  # fmt: skip
    return directory


def frame(side: int, seed: int = 0) -> np.ndarray:
    """A uint16 lattice frame of ``side`` squared (what a detector writes)."""
    return (lattice_image((side, side), seed=seed) * 20000 + 2000).clip(0, 65535).astype(np.uint16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> dict:
    fn()  # warm-up: cuDNN autotuning, allocations
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": repeats}


def bench_dense(model_dir: Path, device: str, sides, strides, precisions, repeats) -> list:
    rows = []
    for precision in precisions:
        engines = {s: TorchDenseEngine(model_dir, s, device=device, precision=precision)
                   for s in (16, 32)}  # fmt: skip
        for side in sides:
            image = frame(side, seed=3)
            for stride in strides:
                engine = engines[stride if stride in engines else 16]
                dev = engine.device
                row = {"side": side, "stride": stride, "precision": engine.precision}
                row["arrays"] = timed(
                    lambda e=engine, i=image, s=stride: e.map_arrays(i, s), dev, repeats
                )
                detector = Detector(load_engine(model_dir, "torch"), dense_engines=[engine])

                def to_regions(detector=detector, image=image, stride=stride):
                    result = detector.map(image, stride=stride, mode="dense")
                    result.regions()
                    return result

                row["regions"] = timed(to_regions, dev, repeats)
                row["mode"] = to_regions().info.get("mode")
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def bench_per_window(model_dir: Path, device: torch.device, batch: int, repeats: int) -> dict:
    from defectscope.nets.checkpoint import load_checkpoint

    model = load_checkpoint(model_dir)[0].eval().to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 64, 64, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)

    def run():
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None),
        ):
            model.forward_with_embedding(x)

    result = timed(run, device, repeats)
    result["windows_per_s"] = batch / (result["median_ms"] / 1e3)
    result["batch"] = batch
    return result


def bench_live(model_dir: Path, device: str, frames: int) -> dict:
    engine = TorchDenseEngine(model_dir, 16, device=device)
    detector = Detector(load_engine(model_dir, "torch"), dense_engines=[engine])
    image = frame(512, seed=5)
    with LiveDetector(detector, options=MapOptions(stride=16, mode="dense")) as live:
        for _ in range(frames):
            live.submit(image)
            live.get(timeout=60)
        return {"frames": frames, **live.latency_percentiles()}


def bench_training_epoch(device: str, patches: int) -> float:
    from defectscope.io.datasets import PatchSet
    from defectscope.training.loop import TrainConfig, train_classifier

    rng = np.random.default_rng(0)
    seeds = rng.integers(0, 10**6, patches)
    images = np.stack([lattice_image((64, 64), seed=int(s)) for s in seeds])
    labels = rng.integers(0, 2, patches)
    data = PatchSet(images.astype(np.float32), labels, ["Bulk", "Vacancy"], [""] * patches)
    config = TrainConfig(epochs=1, batch_size=64, device=device, patience=1)
    start = time.perf_counter()
    train_classifier(data, None, config, progress=False)
    return time.perf_counter() - start


def agreement(model_dir: Path, device: str, side: int) -> dict:
    image = frame(side, seed=7)
    gpu = TorchDenseEngine(model_dir, 16, device=device).map_arrays(image, 16)
    cpu = TorchDenseEngine(model_dir, 16, device="cpu", precision="fp32").map_arrays(image, 16)
    labels = float(np.mean(gpu[1].argmax(-1) == cpu[1].argmax(-1)))
    return {"side": side, "stride": 16, "label_agreement": labels,
            "max_abs_probability_diff": float(np.abs(gpu[1] - cpu[1]).max())}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--model-dir", type=Path, help="a model with dense/ (default: make one)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: PyTorch sees no CUDA GPU here")
    quick = args.quick
    sides = (256,) if quick else (512, 2048, 8192)
    precisions = ("fp32",) if args.device == "cpu" else ("bf16", "fp16")
    device = torch.device(args.device)
    report: dict = {
        "machine": {
            "cpu": cpu_description(),
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "tensorrt": dict(zip(("available", "detail"), tensorrt_available(), strict=True)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or make_model(Path(tmp) / "model")
        started = time.perf_counter()
        report["dense"] = bench_dense(model_dir, args.device, sides, (16, 32), precisions,
                                      repeats=2 if quick else 10)  # fmt: skip
        report["per_window"] = bench_per_window(model_dir, device, 64 if quick else 1024,
                                                repeats=2 if quick else 20)  # fmt: skip
        report["live"] = bench_live(model_dir, args.device, 4 if quick else 200)
        report["agreement"] = agreement(model_dir, args.device, 256 if quick else 1024)
        report["training_epoch_s"] = bench_training_epoch(args.device, 64 if quick else 4096)
        report["wall_s"] = time.perf_counter() - started
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
