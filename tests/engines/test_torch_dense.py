"""The PyTorch dense path (the GPU workstation's engine) against the ONNX dense graph.

Run on the CPU here (device 'cpu', fp32): the same code that runs on a CUDA GPU, with
the ONNX Runtime dense graph of the same weights as the independent reference, and
the C++ ``normalize_region`` as the reference of the on-device normalization. The
GPU tests run only where PyTorch sees a CUDA device and skip with the reason elsewhere.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from defectscope.artifacts.provenance import ProvenanceError
from defectscope.engines.base import EngineError
from defectscope.engines.dense import DenseEngine, dense_file, dense_map_arrays
from defectscope.engines.torch_dense import TorchDenseEngine, load_torch_dense
from defectscope.export.dense import make_dense
from defectscope.tiling.tiler import normalize_region, window_origins
from tests.synthetic import lattice

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch sees no CUDA GPU here")


@pytest.fixture(scope="module")
def dense_dir(model_dir, tmp_path_factory):
    """The toy model with dense graphs made without adapting (steps 0): the weights need
    not be good, only the same in both engines."""
    out = tmp_path_factory.mktemp("models") / "torch-dense"
    shutil.copytree(model_dir, out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        frames = [(lattice((160, 160), seed=s) * 200).astype(np.float32) for s in range(2)]
        make_dense(
            out, frames, [frames[0][:128, :128]], native_strides=(16, 32), steps=0,
            int8=False, crop=128, progress=False,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return out


def frames_of_kinds():
    """``(kind, frame, reference frame)``: the reference is the same frame where an
    offset would cost the C++ tiler precision (a z-score does not see offsets)."""
    base = lattice((200, 232), vacancies=[(8, 9), (15, 20)], seed=4).clip(0, None)
    yield "float32", (base * 200).astype(np.float32), None
    yield "uint16", (base * 3000).astype(np.uint16), None
    yield "big-endian float64", (base * 7.5).astype(">f8"), None
    counts = (base * 3000).astype(np.uint32)
    yield "uint32 + 1e9", counts + np.uint32(1_000_000_000), counts
    yield "Fortran order", np.asfortranarray((base * 90).astype(np.float64)), None


def test_normalization_on_the_device_equals_the_cpp_tiler(dense_dir):
    engine = TorchDenseEngine(dense_dir, 16, device="cpu")
    for kind, frame, reference in frames_of_kinds():
        reference = frame if reference is None else reference
        for origin, shape in [((0, 0), frame.shape), ((37, 11), (80, 101)), ((199, 231), (1, 1))]:
            norm = engine.config.normalization
            want = normalize_region(reference, norm, origin, shape, box=64)
            got = engine.normalize(frame, origin, shape)
            assert got is not None, kind
            np.testing.assert_allclose(got.numpy(), want, atol=3e-4, rtol=1e-4, err_msg=kind)


def test_non_finite_footprint_gives_none_like_the_tiler(dense_dir):
    engine = TorchDenseEngine(dense_dir, 16, device="cpu")
    frame = (lattice((128, 128), seed=1) * 100).astype(np.float32)
    frame[60, 60] = np.nan
    assert normalize_region(frame, engine.config.normalization, (40, 40), (40, 40)) is None
    assert engine.normalize(frame, (40, 40), (40, 40)) is None
    assert engine.map_arrays(frame, 16) is None  # the per-window path handles NaN


@pytest.mark.parametrize("native, stride", [(16, 16), (16, 32), (32, 32)])
def test_torch_dense_map_equals_the_onnx_dense_graph(dense_dir, native, stride):
    onnx = DenseEngine(dense_dir / "dense" / dense_file(native), threads=1)
    engine = TorchDenseEngine(dense_dir, native, device="cpu", precision="fp32")
    assert engine.classes == onnx.classes and engine.dense == onnx.dense
    frame = (lattice((290, 200), vacancies=[(10, 12), (25, 20)], seed=7) * 200).clip(0, None)
    frame = frame.astype(np.uint16)
    # A small crop forces several regions, so the crop plan and the gather are exercised.
    want = dense_map_arrays(onnx, frame, stride, crop=192)
    got = engine.map_arrays(frame, stride, crop=192)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], atol=2e-4)
    np.testing.assert_allclose(got[2], want[2], atol=2e-3, rtol=2e-3)
    # Labels: equal wherever the reference's top two classes are not a near tie.
    top2 = np.sort(want[1], axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-3
    assert np.array_equal(got[1].argmax(-1)[clear], want[1].argmax(-1)[clear])


def test_map_without_embeddings_and_cancel(dense_dir):
    engine = TorchDenseEngine(dense_dir, 16, device="cpu")
    frame = (lattice((160, 160), seed=2) * 200).astype(np.float32)
    origins, probs, emb = engine.map_arrays(frame, 16, keep_embeddings=False)
    want = window_origins(frame.shape, engine.config.patch_size, 16)
    np.testing.assert_array_equal(origins, want)
    assert emb is None
    assert probs.shape[:2] == (len(np.unique(want[:, 0])), len(np.unique(want[:, 1])))

    class Stop(Exception):
        pass

    def cancel():
        raise Stop

    with pytest.raises(Stop):
        engine.map_arrays(frame, 16, cancel=cancel)


def test_bad_artifacts_and_settings_give_engine_errors(dense_dir, model_dir, tmp_path):
    with pytest.raises(EngineError, match="densify"):
        TorchDenseEngine(model_dir, 16, device="cpu")  # no dense/ folder
    with pytest.raises(EngineError, match="native stride"):
        TorchDenseEngine(dense_dir, 12, device="cpu")
    with pytest.raises(EngineError, match="precision"):
        TorchDenseEngine(dense_dir, 16, device="cpu", precision="int4")
    with pytest.raises(EngineError, match="fp16"):
        TorchDenseEngine(dense_dir, 16, device="cpu", precision="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="no CUDA"):
            TorchDenseEngine(dense_dir, 16, device="cuda")
    broken = tmp_path / "broken"
    shutil.copytree(dense_dir, broken)
    (broken / "dense" / "dense.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ProvenanceError, match="changed since densify"):
        TorchDenseEngine(broken, 16, device="cpu")
    assert [e.dense.native_stride for e in load_torch_dense(dense_dir, device="cpu")] == [32, 16]
    assert load_torch_dense(model_dir, device="cpu") == []


@GPU
def test_cuda_bf16_labels_agree_with_the_cpu_fp32_path(dense_dir):
    cpu = TorchDenseEngine(dense_dir, 16, device="cpu", precision="fp32")
    gpu = TorchDenseEngine(dense_dir, 16, device="cuda", precision="auto")
    frame = (lattice((512, 512), vacancies=[(10, 12), (40, 30)], seed=3) * 200).astype(np.float32)
    want = cpu.map_arrays(frame, 16)
    got = gpu.map_arrays(frame, 16)
    np.testing.assert_array_equal(got[0], want[0])
    assert np.mean(got[1].argmax(-1) == want[1].argmax(-1)) >= 0.99
    norm_cpu = normalize_region(frame, cpu.config.normalization, (0, 0), frame.shape, box=64)
    norm_gpu = gpu.normalize(frame, (0, 0), frame.shape).cpu().numpy()
    np.testing.assert_allclose(norm_gpu, norm_cpu, atol=3e-4, rtol=1e-4)
