"""The study's checks report the precision they ran at, and D4 averages what it says."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.special import softmax

from defectscope.engines.pytorch import TorchEngine
from defectscope.maps.detector import Detector
from defectscope.nets.checkpoint import load_checkpoint
from defectscope.studies.study import symmetry_effect
from defectscope.tiling.tiler import patches_to_inputs
from defectscope.training.loop import TrainConfig
from tests.synthetic import toy_patches


def _reference(model, inputs: np.ndarray, temperature: float) -> np.ndarray:
    with torch.inference_mode():
        logits = model(torch.from_numpy(np.ascontiguousarray(inputs))).numpy()
    return softmax(logits / temperature, axis=1)


def test_the_d4_check_averages_the_eight_views_and_says_its_precision(model_dir):
    model, _, _ = load_checkpoint(model_dir)
    model.eval()
    patches = toy_patches(4, seed=7)
    config = TrainConfig(precision="fp32")
    report = symmetry_effect(model, patches.images, patches.labels, config, temperature=1.5)
    assert report["precision"] == "fp32" and report["n_test"] == len(patches.labels)
    inputs = patches_to_inputs(patches.images, config.normalization)
    plain = _reference(model, inputs, 1.5)
    views = [
        _reference(model, view, 1.5)
        for turns in range(4)
        for view in (np.rot90(inputs, turns, (2, 3)), np.rot90(inputs, turns, (2, 3))[..., ::-1])
    ]
    labels = patches.labels
    assert report["accuracy_none"] == pytest.approx(np.mean(plain.argmax(1) == labels))
    assert report["accuracy_d4"] == pytest.approx(np.mean(np.mean(views, 0).argmax(1) == labels))
    assert 0 < report["seconds_none"] < report["seconds_d4"]
    # Asked for bf16, it runs (and says) bf16, on any CPU.
    bf16 = symmetry_effect(
        model, patches.images, labels, dataclasses.replace(config, precision="bf16"), 1.5
    )
    assert bf16["precision"] == "bf16"


@pytest.mark.parametrize(("asked", "used"), [("fp32", "fp32"), ("bf16", "bf16")])
def test_the_torch_engine_says_the_precision_it_runs_at(model_dir, asked, used):
    if torch.cuda.is_available():
        pytest.skip("on a CUDA GPU the PyTorch engine runs fp32 whatever is asked")
    engine = TorchEngine(model_dir, precision=asked)
    assert engine.precision_used == used
    with Detector.load(model_dir, backend="torch", precision=asked) as detector:
        assert detector.engine.precision_used == used
