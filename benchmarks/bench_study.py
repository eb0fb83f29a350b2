"""The main job's inner loops, before and after their speed-ups (issue 28).

- ``training step``: one AdamW step of VGG-16-BN on 32 windows (bf16 autocast where the
  CPU has it, as training runs), NCHW input and the per-tensor optimizer (before) against
  channels-last input (``nets.device.model_input``) and the fused optimizer (now).
- ``inference``: 128 windows in fp32 eval mode (densities, scores, the PyTorch engine),
  NCHW against channels-last.
- ``locating crops``: 64 crops of 64 px located in a 512^2 frame, skimage's
  ``match_template`` per crop (before) against the shared-FFT correlator (now).

The CPU is recorded with each result (``extra_info["cpu"]``). Run::

    .venv/bin/python -m pytest benchmarks/bench_study.py \\
        --benchmark-json=benchmarks/results/study.json
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectscope.evaluation.provenance import locate_patches, match_template
from defectscope.nets.device import autocast_dtype, model_input
from defectscope.nets.vgg import build_model
from defectscope.simulate.lattice import lattice_image
from defectscope.util.system import cpu_description

INPUTS = ("nchw", "channels_last")


def _batch(n: int, layout: str) -> torch.Tensor:
    x = np.random.default_rng(0).normal(size=(n, 3, 64, 64)).astype(np.float32)
    return model_input(x) if layout == "channels_last" else torch.from_numpy(x)


@pytest.mark.parametrize("layout", INPUTS, ids=("before", "now"))
def test_training_step(benchmark, layout):
    benchmark.group = "training step, 32 windows"
    benchmark.extra_info["cpu"] = cpu_description()
    torch.manual_seed(0)
    model = build_model(7, weights="none", patch_size=64, architecture="vgg16_bn").train()
    fused = layout == "channels_last"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    x, y = _batch(32, layout), torch.arange(32) % 7
    dtype = autocast_dtype("auto")

    def step():
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    benchmark.pedantic(step, rounds=5, warmup_rounds=2)


@pytest.mark.parametrize("layout", INPUTS)
def test_inference(benchmark, layout):
    benchmark.group = "fp32 inference, 128 windows"
    benchmark.extra_info["cpu"] = cpu_description()
    torch.manual_seed(0)
    model = build_model(7, weights="none", patch_size=64, architecture="vgg16_bn").eval()
    x = _batch(128, layout)

    @torch.inference_mode()
    def run():
        return [model.forward_with_embedding(x[s : s + 64]) for s in (0, 64)]

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


@pytest.fixture(scope="module")
def frame_and_crops():
    frame = (lattice_image((512, 512), spacing=9.0, noise=0.2, seed=3) * 200).clip(0, 255)
    rng = np.random.default_rng(1)
    corners = rng.integers(0, 512 - 64, (64, 2))
    crops = np.stack([frame[y : y + 64, x : x + 64] for y, x in corners])
    return frame, crops, corners


@pytest.mark.parametrize("how", ("per-crop skimage", "shared FFT"))
def test_locate_crops(benchmark, frame_and_crops, how):
    benchmark.group = "locating 64 crops in a 512^2 frame"
    benchmark.extra_info["cpu"] = cpu_description()
    frame, crops, corners = frame_and_crops

    def per_crop():
        best = [match_template(frame, crop) for crop in crops]
        return np.array([np.unravel_index(b.argmax(), b.shape) for b in best])

    if how == "shared FFT":
        positions = benchmark.pedantic(
            lambda: locate_patches(frame, crops, threshold=0.97)[0], rounds=3, warmup_rounds=1
        )
    else:
        positions = benchmark.pedantic(per_crop, rounds=3, warmup_rounds=1)
    np.testing.assert_array_equal(positions, corners)
