"""Dense maps: one trunk pass over the frame, checked against per-window evaluation.

Exact where the mathematics says exact: the per-pixel normalization against a numpy
reference, the convolutional rewrite against the model on a lone window, strides 16
and 8 against stride 32, and a map cut into crops against the same map in one crop.
The adapted (distilled) fixture is checked to agree with the per-window model before
the tests use it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from defectscope.cli import main
from defectscope.engines.dense import DenseEngine, dense_map_arrays, find_dense_all
from defectscope.engines.tensorrt import tensorrt_available
from defectscope.export.dense import make_dense
from defectscope.maps.detector import Detector
from defectscope.nets.dense import DenseDefectNet, receptive_margin
from defectscope.nets.vgg import build_model
from defectscope.tiling.tiler import normalize_region, normalize_region_numpy, window_origins
from tests.conftest import NOMINAL, region_scores
from tests.references import (
    assert_scored_like,
    ensemble_mutual_information,
    thinned_head_mutual_information,
)
from tests.synthetic import acquired_lattice, lattice

DTYPES = ["uint8", "uint16", "int16", "int32", "uint32", "float32", "float64"]


def clustered_frame(shape, seed: int, n: int = 5) -> np.ndarray:
    """A uint8 lattice frame with ``n`` 2x2 vacancy clusters away from the edges."""
    rng = np.random.default_rng(seed)
    rows, cols = shape[0] // 8, shape[1] // 8
    clusters = [(int(rng.integers(2, rows - 3)), int(rng.integers(2, cols - 3))) for _ in range(n)]
    vacancies = [(i + a, j + b) for i, j in clusters for a in (0, 1) for b in (0, 1)]
    return (lattice(shape, vacancies=vacancies, seed=seed) * 200).clip(0, 255).astype(np.uint8)


# --- per-pixel normalization (C++) against numpy ---------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_region_matches_numpy(dtype):
    rng = np.random.default_rng(1)
    frame = (rng.normal(size=(150, 133)) * 20 + 100).clip(0, None).astype(dtype)
    for mode in ("zscore", "minmax"):
        if mode == "minmax" and dtype.startswith("float"):
            continue  # float frames need an explicit range
        for origin, shape in [((0, 0), None), ((37, 11), (80, 101)), ((149, 132), (1, 1))]:
            got = normalize_region(frame, mode, origin, shape, threads=2)
            want = normalize_region_numpy(frame, mode, origin, shape)
            np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_normalize_region_alone_equals_whole_frame_exactly():
    frame = np.random.default_rng(2).integers(0, 65535, (300, 257)).astype(np.uint16)
    whole = normalize_region(frame)
    for threads in (1, 3):
        part = normalize_region(frame, origin=(37, 101), shape=(100, 90), threads=threads)
        assert np.array_equal(part, whole[:, 37:137, 101:191])


def test_normalize_region_reads_views_memmaps_and_big_endian(tmp_path):
    frame = np.random.default_rng(3).integers(0, 4000, (120, 140)).astype(np.uint16)
    want = normalize_region_numpy(frame)
    path = tmp_path / "frame.npy"
    np.save(path, frame.astype(">u2"))
    big = np.load(path, mmap_mode="r")
    np.testing.assert_allclose(normalize_region(big), want, atol=2e-5)
    wide = np.zeros((120, 280), np.uint16)
    wide[:, ::2] = frame
    np.testing.assert_allclose(normalize_region(wide[:, ::2]), want, atol=2e-5)
    transposed = np.ascontiguousarray(frame.T).T
    np.testing.assert_allclose(normalize_region(transposed), want, atol=2e-5)


def test_normalize_region_imagenet_has_three_channels():
    frame = np.random.default_rng(4).integers(0, 255, (70, 80)).astype(np.uint8)
    got = normalize_region(frame, "imagenet")
    assert got.shape == (3, 70, 80)
    np.testing.assert_allclose(got, normalize_region_numpy(frame, "imagenet"), atol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_normalize_region_gives_way_on_values_it_cannot_take(bad):
    frame = np.ones((80, 80), np.float64)
    frame[40, 40] = bad
    assert normalize_region(frame) is None
    # Outside every footprint of the region: the region is fine.
    assert normalize_region(frame, origin=(0, 0), shape=(4, 4)) is not None


def test_normalize_region_rejects_bad_arguments():
    frame = np.zeros((64, 64), np.uint16)
    with pytest.raises(ValueError, match="does not fit"):
        normalize_region(frame, origin=(2**63 - 10, 0), shape=(8, 8))
    with pytest.raises(ValueError, match="does not fit"):
        normalize_region(frame, origin=(60, 0), shape=(8, 8))
    with pytest.raises(ValueError, match="even"):
        normalize_region(frame, box=7)
    with pytest.raises(ValueError, match="2-D"):
        normalize_region(np.zeros((2, 64, 64)))
    with pytest.raises(ValueError, match="shape"):
        normalize_region(frame, out=np.empty((3, 64, 64), np.float32))


# --- the convolutional rewrite ---------------------------------------------------


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    return build_model(3).eval()


def test_dense_rewrite_equals_the_model_on_a_lone_window(random_model):
    x = torch.randn(5, 1, 64, 64)
    dense = DenseDefectNet(random_model, 32, in_channels=1, temperature=1.7).eval()
    with torch.no_grad():
        logits, embedding = random_model.forward_with_embedding(x.repeat(1, 3, 1, 1))
        probs, emb = dense(x)
    assert probs.shape == (5, 3, 1, 1)
    torch.testing.assert_close(probs[..., 0, 0], torch.softmax(logits / 1.7, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(emb[..., 0, 0], embedding, atol=1e-4, rtol=1e-4)


def test_finer_native_strides_hold_the_coarser_grid(random_model):
    """Strides 16 and 8 evaluate every shifted stride-32 grid, the stride-32 windows among them."""
    dense32 = DenseDefectNet(random_model, 32).eval()
    x = torch.randn(1, 1, 256, 224)
    with torch.no_grad():
        p32, _ = dense32(x)
        p16, _ = dense32.with_stride(16)(x)
        p8, _ = dense32.with_stride(8)(x)
        shifted, _ = dense32(x[..., 16:, 16:])  # the stride-16 windows at odd positions
    assert p16.shape[-2:] == ((256 - 64) // 16 + 1, (224 - 64) // 16 + 1)
    assert p8.shape[-2:] == ((256 - 64) // 8 + 1, (224 - 64) // 8 + 1)
    torch.testing.assert_close(p16[..., ::2, ::2], p32, atol=1e-6, rtol=0)
    torch.testing.assert_close(p8[..., ::4, ::4], p32, atol=1e-6, rtol=0)
    # Away from the frame's edges (whose padding differs) the shift is exact.
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))
    odd = p16[..., 1::2, 1::2][..., : shifted.shape[2], : shifted.shape[3]]
    torch.testing.assert_close(odd[inner], shifted[inner], atol=1e-6, rtol=0)


def test_receptive_margin_is_where_gradients_reach(random_model):
    dense = DenseDefectNet(random_model, 32).eval()
    x = torch.randn(1, 1, 448, 448, requires_grad=True)
    _, emb = dense(x)
    emb[0, :, 5, 5].sum().backward()
    rows = torch.nonzero(x.grad[0, 0].abs().sum(1)).ravel()
    margin = receptive_margin(random_model, 64)
    assert (int(rows.min()), int(rows.max())) == (5 * 32 - margin, 5 * 32 + 63 + margin)


# --- the adapted fixture and the runtime ------------------------------------------


def acquired_frame(shape, seed: int, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """A frame recorded like the acquisition model's patches, ``n`` clusters at random."""
    rng = np.random.default_rng(seed)
    rows, cols = shape[0] // 8, shape[1] // 8
    clusters = [(int(rng.integers(1, rows - 2)), int(rng.integers(1, cols - 2))) for _ in range(n)]
    return acquired_lattice(shape, clusters, seed=seed, **NOMINAL)


def compare_maps(det, seeds) -> dict:
    """Dense against window by window: label agreement and region scores at known defects."""
    scores = {"agreement": [], "dense": [], "window": []}
    for seed in seeds:
        frame, centres = acquired_frame((224, 256), seed)
        dense, window = det.map(frame, 16, mode="dense"), det.map(frame, 16, mode="window")
        scores["agreement"].append(float(np.mean(dense.labels == window.labels)))
        scores["dense"].append(region_scores(dense.regions(), centres))
        scores["window"].append(region_scores(window.regions(), centres))
    summary = {"agreement": float(np.mean(scores["agreement"]))}
    for mode in ("dense", "window"):
        for key in ("recall", "precision"):
            summary[f"{mode}_{key}"] = float(np.mean([s[key] for s in scores[mode]]))
    return summary


def dense_is_right(summary: dict) -> str | None:
    if summary["agreement"] < 0.95:
        return f"label agreement {summary['agreement']:.3f}"
    for key in ("recall", "precision"):
        if summary[f"dense_{key}"] < summary[f"window_{key}"] - 0.1:
            return (
                f"{key} dense {summary[f'dense_{key}']:.2f}, window {summary[f'window_{key}']:.2f}"
            )
    return None


@pytest.fixture(scope="module")
def dense_model_dir(acquisition_model_dir, tmp_path_factory):
    """The acquisition model with a distilled dense graph, checked to find what it finds."""
    from defectscope.export.onnx import export_onnx

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reasons = []
    try:
        for seed, steps in ((0, 30), (1, 60)):
            out = tmp_path_factory.mktemp("models") / f"acquisition-dense-{seed}"
            shutil.copytree(acquisition_model_dir, out)
            export_onnx(out, out / "model.onnx")
            frames = [acquired_frame((224, 224), s, n=6)[0] for s in range(3)]
            record = make_dense(
                out, frames, [acquired_frame((192, 192), 9)[0]], steps=steps, crop=224,
                batch_size=2, int8=False, seed=seed, progress=False,
            )  # fmt: skip
            with Detector.load(out) as det:
                reason = dense_is_right(compare_maps(det, seeds=(31, 32)))
            if reason is None:
                return out, record
            reasons.append(f"seed {seed}: {reason}")
    finally:
        torch.set_num_threads(threads)
    raise RuntimeError("no dense fixture passed its check: " + "; ".join(reasons))


def test_make_dense_writes_graphs_and_measures_agreement(dense_model_dir):
    model_dir, record = dense_model_dir
    assert [p.name for p in find_dense_all(model_dir)] == ["dense16.onnx"]
    saved = json.loads((model_dir / "dense" / "dense.json").read_text())
    assert saved["agreement"]["fp32"]["windows"] == ((192 - 64) // 16 + 1) ** 2
    assert saved == json.loads(json.dumps(record))
    assert 0.0 <= saved["agreement"]["fp32"]["agreement"] <= 1.0
    # Every recalibrated source is checked against the per-window model's on the check frame.
    fp32 = saved["agreement"]["fp32"]
    for key in ("unknown", "mc_dropout_unknown", "ensemble_unknown"):
        assert 0.0 <= fp32[f"{key}_agreement"] <= 1.0, key
        assert fp32[f"{key}_share"].keys() == {"window", "dense"}
    engine = DenseEngine(model_dir / "dense" / "dense16.onnx")
    assert engine.dense.margin == 90 and engine.dense.native_stride == 16
    # The uncertainty travels with the dense graph.
    assert engine.density is not None and engine.mc_dropout is not None
    assert engine.head_ensemble is not None
    assert record["distillation"]["teacher_windows"] == 3 * ((224 - 64) // 16 + 1) ** 2


@pytest.mark.parametrize("stride", [16, 32, 48])
def test_dense_map_cut_into_crops_equals_one_crop(dense_model_dir, stride):
    """Any crop size gives the same map, bit for bit: each crop carries the full margin."""
    engine = DenseEngine(dense_model_dir[0] / "dense" / "dense16.onnx", threads=1)
    frame = np.random.default_rng(5).integers(0, 60000, (355, 421)).astype(np.uint16)
    origins, small, small_emb = dense_map_arrays(engine, frame, stride, crop=320)
    _, whole, whole_emb = dense_map_arrays(engine, frame, stride, crop=1024)
    assert np.array_equal(origins, window_origins(frame.shape, 64, stride))
    assert small.shape[:2] == (len(np.unique(origins[:, 0])), len(np.unique(origins[:, 1])))
    assert np.array_equal(small, whole)
    assert np.array_equal(small_emb, whole_emb)


def test_detector_maps_densely_where_it_can_and_says_why_not(dense_model_dir):
    model_dir = dense_model_dir[0]
    frame = clustered_frame((200, 232), 40)
    with Detector.load(model_dir) as det:
        dense = det.map(frame, stride=16)
        assert dense.info["mode"] == "dense" and dense.info["native_stride"] == 16
        assert dense.uncertainty is not None and dense.embeddings is not None
        window = det.map(frame, stride=16, mode="window")
        assert window.info == {"mode": "window", "novelty": ["embedding"]}
        assert dense.info["novelty"] == ["embedding"]
        assert np.array_equal(dense.origins, window.origins)
        odd = det.map(frame, stride=24)
        assert odd.info["mode"] == "window" and "stride 24" in odd.info["reason"]
        with pytest.raises(ValueError, match="stride 24"):
            det.map(frame, stride=24, mode="dense")
        assert "symmetry" in det.map(frame, stride=16, symmetry="d4").info["reason"]
        holes = frame.astype(np.float32)
        holes[50, 60] = np.nan
        patched = det.map(holes, stride=16, nan_policy="zero")
        assert patched.info["mode"] == "window" and "non-finite" in patched.info["reason"]
        with pytest.raises(ValueError, match="mode"):
            det.map(frame, mode="fast")
    with Detector.load(model_dir, dense=False) as det:
        assert "densify" in det.map(frame, stride=16).info["reason"]


def test_residual_novelty_is_the_same_in_dense_and_window_maps(dense_model_dir):
    """The lattice residual is scored from each window's pixels in both paths."""
    from defectscope.artifacts.residual_density import fit_residual_density
    from tests.conftest import acquisition_patches

    train, held = acquisition_patches(24, seed=0), acquisition_patches(12, seed=1)
    residual = fit_residual_density(train.images, train.labels, 2, held.images)
    frame = clustered_frame((200, 232), 40)
    with Detector.load(dense_model_dir[0]) as det:
        embedding_only = det.map(frame, stride=16, mode="dense")
        for engine in (det.engine, *det.dense_engines):
            engine.residual_density = residual
        dense = det.map(frame, stride=16, mode="dense", novelty="residual")
        window = det.map(frame, stride=16, mode="window", novelty="residual")
        both = det.map(frame, stride=16, mode="dense", novelty="embedding+residual")
    assert dense.info["novelty"] == window.info["novelty"] == ["lattice residual"]
    np.testing.assert_allclose(dense.uncertainty, window.uncertainty, atol=1e-6)
    assert np.array_equal(dense.unknown, window.unknown)
    assert both.info["novelty"] == ["embedding", "lattice residual"]
    np.testing.assert_allclose(
        both.uncertainty, np.maximum(embedding_only.uncertainty, dense.uncertainty), atol=1e-6
    )
    assert np.array_equal(both.unknown, embedding_only.unknown | dense.unknown)


def test_mc_dropout_novelty_maps_window_by_window_and_densely(dense_model_dir):
    """novelty="mc_dropout" scores each window's embedding with the head the artifact
    carries: the trained model's last layer in model.json and model.onnx, the distilled
    student's in the dense graphs, each on its own calibrated scale."""
    from defectscope.artifacts.disagreement import DROPOUT_SAMPLES, DropoutNovelty
    from defectscope.nets.checkpoint import load_checkpoint

    model_dir = dense_model_dir[0]
    model, config, record = load_checkpoint(model_dir)
    stored = DropoutNovelty.from_dict(record["mc_dropout"], 2, config.embedding_dim)
    np.testing.assert_array_equal(stored.weight, model.classifier.weight.detach().numpy())
    assert stored.rate == model.dropout.p
    assert stored.kept.shape == (DROPOUT_SAMPLES, config.embedding_dim)
    student = torch.load(model_dir / "dense" / "dense.pt", weights_only=True)
    frame = clustered_frame((200, 232), 40)
    with Detector.load(model_dir, backend="onnxruntime") as det:
        assert det.engine.name == "onnxruntime"
        window = det.map(frame, stride=16, mode="window", novelty="mc_dropout")
        dense = det.map(frame, stride=16, mode="dense", novelty="mc_dropout")
        default = det.map(frame, stride=16, mode="dense")
        dense_head = det.dense_engines[0].mc_dropout
    assert window.info["novelty"] == dense.info["novelty"] == ["MC dropout"]
    assert default.info["novelty"] == ["embedding"]  # auto does not take it
    for result, head, weight in (
        (window, stored, stored.weight),
        (dense, dense_head, student["classifier.weight"].numpy().reshape(2, -1)),
    ):
        np.testing.assert_array_equal(head.weight, weight)
        np.testing.assert_array_equal(head.kept, stored.kept)
        flat = result.embeddings.reshape(-1, result.embeddings.shape[-1])
        mutual = thinned_head_mutual_information(flat, head.weight, head.bias, head.kept, head.rate)
        assert_scored_like(result, mutual, head)
    # The student's scale is its own, carried over from the per-window model's.
    assert dense_head.threshold != stored.threshold
    assert "quantile-matched" in dense_head.source


def test_ensemble_novelty_maps_window_by_window_and_densely(dense_model_dir):
    """novelty="ensemble" scores each window's embedding with the members model.json
    carries, in model.onnx and the dense graphs alike, each on its own calibrated scale."""
    from defectscope.artifacts.disagreement import EnsembleNovelty
    from defectscope.nets.checkpoint import load_checkpoint

    model_dir = dense_model_dir[0]
    _, config, record = load_checkpoint(model_dir)
    stored = EnsembleNovelty.from_dict(record["head_ensemble"], 2, config.embedding_dim)
    assert len(stored.members) == 5
    frame = clustered_frame((200, 232), 40)
    with Detector.load(model_dir, backend="onnxruntime") as det:
        window = det.map(frame, stride=16, mode="window", novelty="ensemble")
        dense = det.map(frame, stride=16, mode="dense", novelty="ensemble")
        default = det.map(frame, stride=16, mode="dense")
        window_heads = det.engine.head_ensemble  # read from model.onnx
        dense_heads = det.dense_engines[0].head_ensemble
    assert window.info["novelty"] == dense.info["novelty"] == ["head ensemble"]
    assert default.info["novelty"] == ["embedding"]  # auto does not take it
    assert window_heads.threshold == stored.threshold
    for result, heads in ((window, window_heads), (dense, dense_heads)):
        # The members read the embedding, which distillation keeps: the same heads.
        for a, b in zip(heads.members, stored.members, strict=True):
            np.testing.assert_array_equal(a.hidden_weight, b.hidden_weight)
            np.testing.assert_array_equal(a.weight, b.weight)
        flat = result.embeddings.reshape(-1, result.embeddings.shape[-1])
        mutual = ensemble_mutual_information(flat, heads.members)
        assert_scored_like(result, mutual, heads)
    assert dense_heads.threshold != stored.threshold
    assert "quantile-matched" in dense_heads.source


@pytest.mark.parametrize(
    ("recorded", "name"), [("ensemble", "head ensemble"), ("mc_dropout", "MC dropout")]
)
def test_a_recorded_source_with_residual_combines_the_two(dense_model_dir, recorded, name):
    """novelty="ensemble+residual" (and "mc_dropout+residual"): a window either source
    calls unknown is unknown, at the larger of the two calibrated uncertainties, in
    window and dense maps alike; a model without the residual's density is refused by
    name."""
    novelty = f"{recorded}+residual"
    from defectscope.artifacts.residual_density import fit_residual_density
    from tests.conftest import acquisition_patches

    train, held = acquisition_patches(24, seed=0), acquisition_patches(12, seed=1)
    residual = fit_residual_density(train.images, train.labels, 2, held.images)
    frame = clustered_frame((200, 232), 40)
    with Detector.load(dense_model_dir[0], backend="onnxruntime") as det:
        with pytest.raises(ValueError, match="no lattice-residual density"):
            det.map(frame, stride=16, mode="window", novelty=novelty)
        for engine in (det.engine, *det.dense_engines):
            engine.residual_density = residual
        for mode in ("window", "dense"):
            pair = det.map(frame, stride=16, mode=mode, novelty=novelty)
            parts = [
                det.map(frame, stride=16, mode=mode, novelty=n) for n in (recorded, "residual")
            ]
            assert pair.info["novelty"] == [name, "lattice residual"]
            np.testing.assert_allclose(
                pair.uncertainty, np.maximum(*(p.uncertainty for p in parts)), atol=1e-6
            )
            assert np.array_equal(pair.unknown, parts[0].unknown | parts[1].unknown)
            # The residual changes the recorded source's map on this frame, or the test
            # could not tell the union from that source alone.
            assert not np.array_equal(pair.unknown, parts[0].unknown) or not np.allclose(
                pair.uncertainty, parts[0].uncertainty
            )
            assert pair.info["ood_check"] == "embedding density"
            np.testing.assert_array_equal(pair.frame_unknown, parts[0].frame_unknown)
        # Without embeddings kept, a dense map still gathers them for the frame check.
        lean = det.map(frame, stride=16, mode="dense", novelty="residual", keep_embeddings=False)
        assert lean.embeddings is None and lean.info["ood_check"] == "embedding density"
        np.testing.assert_array_equal(lean.frame_unknown, parts[0].frame_unknown)


def test_auto_is_the_ensemble_with_the_residual_where_the_model_carries_both(dense_model_dir):
    """novelty="auto" maps as "ensemble+residual" when a model carries the head ensemble
    and the residual's density (as trained models do), window and dense maps alike; a
    model without either maps with every density it carries, as "embedding+residual"
    names explicitly (the union of the two, refused without the residual)."""
    from defectscope.artifacts.residual_density import fit_residual_density
    from tests.conftest import acquisition_patches

    train, held = acquisition_patches(24, seed=0), acquisition_patches(12, seed=1)
    residual = fit_residual_density(train.images, train.labels, 2, held.images)
    frame = clustered_frame((200, 232), 40)
    with Detector.load(dense_model_dir[0], backend="onnxruntime") as det:
        with pytest.raises(ValueError, match="no lattice-residual density"):
            det.map(frame, stride=16, novelty="embedding+residual")
        assert det.map(frame, stride=16).info["novelty"] == ["embedding"]  # no residual
        for engine in (det.engine, *det.dense_engines):
            engine.residual_density = residual
        for mode in ("window", "dense"):
            auto = det.map(frame, stride=16, mode=mode)
            pair = det.map(frame, stride=16, mode=mode, novelty="ensemble+residual")
            assert auto.info["novelty"] == ["head ensemble", "lattice residual"]
            assert auto.info["ood_check"] == "embedding density"
            for field in ("unknown", "uncertainty", "frame_unknown"):
                np.testing.assert_array_equal(getattr(auto, field), getattr(pair, field))
        # A dense graph made before the ensemble existed: auto is resolved on the window
        # model, so the map leaves the graph rather than map with other sources.
        kept = det.dense_engines[0].head_ensemble
        det.dense_engines[0].head_ensemble = None
        fallback = det.map(frame, stride=16)
        assert fallback.info["mode"] == "window"
        assert "'ensemble+residual'" in fallback.info["reason"]
        assert fallback.info["novelty"] == ["head ensemble", "lattice residual"]
        det.dense_engines[0].head_ensemble = kept
        for engine in (det.engine, *det.dense_engines):
            engine.head_ensemble = None
        for mode in ("window", "dense"):
            auto = det.map(frame, stride=16, mode=mode)
            named = det.map(frame, stride=16, mode=mode, novelty="embedding+residual")
            parts = [
                det.map(frame, stride=16, mode=mode, novelty=n) for n in ("embedding", "residual")
            ]
            assert (
                auto.info["novelty"] == named.info["novelty"] == ["embedding", "lattice residual"]
            )
            assert "ood_check" not in named.info  # the density judges the windows itself
            np.testing.assert_array_equal(auto.unknown, named.unknown)
            np.testing.assert_array_equal(named.unknown, parts[0].unknown | parts[1].unknown)
            np.testing.assert_allclose(
                named.uncertainty, np.maximum(*(p.uncertainty for p in parts)), atol=1e-6
            )
        for engine in (det.engine, *det.dense_engines):
            engine.density = None
        with pytest.raises(ValueError, match="no embedding density"):
            det.map(frame, stride=16, mode="window", novelty="embedding+residual")


def test_the_embedding_density_still_checks_the_frame_for_other_sources(dense_model_dir):
    """With novelty="ensemble" the windows are the ensemble's, but the embedding density
    still says whether the frame is unlike the training data: a density calling every
    window unknown makes the frame out of distribution, window and dense maps alike."""
    frame = clustered_frame((200, 232), 40)
    with Detector.load(dense_model_dir[0], backend="onnxruntime") as det:
        plain = {}
        for mode in ("window", "dense"):
            plain[mode] = det.map(frame, stride=16, mode=mode, novelty="ensemble")
            embedding = det.map(frame, stride=16, mode=mode, novelty="embedding")
            assert plain[mode].info["ood_check"] == "embedding density"
            np.testing.assert_array_equal(plain[mode].frame_unknown, embedding.unknown)
            # Where the density judges the windows it needs no second look.
            assert embedding.frame_unknown is None and "ood_check" not in embedding.info
        for engine in (det.engine, *det.dense_engines):
            engine.density = dataclasses.replace(engine.density, threshold=-1.0)
        for mode in ("window", "dense"):
            flagged = det.map(frame, stride=16, mode=mode, novelty="ensemble")
            np.testing.assert_array_equal(flagged.unknown, plain[mode].unknown)
            np.testing.assert_array_equal(flagged.uncertainty, plain[mode].uncertainty)
            # At a threshold the ensemble's own unknown windows stay under, only the
            # density's check makes the frame out of distribution.
            strict = dataclasses.replace(flagged, ood_threshold=0.9)
            assert flagged.frame_unknown.all() and strict.unexplained_share < 0.9
            assert strict.out_of_distribution
            assert not dataclasses.replace(strict, frame_unknown=None).out_of_distribution


def test_auto_maps_window_by_window_where_the_dense_graph_lacks_the_source(dense_model_dir, caplog):
    """A dense graph made before a source existed: auto falls back to the window model
    that carries it, says why (and logs it once); dense refuses by name."""
    frame = clustered_frame((160, 160), 42)
    with Detector.load(dense_model_dir[0], backend="onnxruntime") as det:
        det.dense_engines[0].head_ensemble = None
        with caplog.at_level("WARNING", logger="defectscope.maps.detector"):
            auto = det.map(frame, stride=16, novelty="ensemble")
            det.map(frame, stride=16, novelty="ensemble")
        assert auto.info["mode"] == "window" and auto.info["novelty"] == ["head ensemble"]
        assert "carries no record for novelty 'ensemble'" in auto.info["reason"]
        fallbacks = [r for r in caplog.records if "window by window" in r.getMessage()]
        assert len(fallbacks) == 1 and "'ensemble'" in fallbacks[0].getMessage()
        with pytest.raises(ValueError, match="no head-ensemble record"):
            det.map(frame, stride=16, mode="dense", novelty="ensemble")
        assert det.map(frame, stride=16).info["mode"] == "dense"  # others still dense


@pytest.mark.parametrize(
    ("novelty", "what"), [("mc_dropout", "MC-dropout"), ("ensemble", "head-ensemble")]
)
def test_a_recorded_novelty_source_needs_a_model_that_carries_it(density_model_dir, novelty, what):
    with Detector.load(density_model_dir, backend="torch") as det:
        with pytest.raises(ValueError, match=f"no {what} record"):
            det.map(clustered_frame((128, 128), 3), stride=16, novelty=novelty)


def test_dense_map_finds_what_the_window_map_finds(dense_model_dir):
    """On frames the dense graph never saw: the same labels and the same defects found."""
    with Detector.load(dense_model_dir[0]) as det:
        summary = compare_maps(det, seeds=(51, 52, 53))
    assert dense_is_right(summary) is None, summary


def test_densify_and_map_from_the_command_line(density_model_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(density_model_dir, model_dir)
    frames = []
    for seed in range(2):
        path = tmp_path / f"f{seed}.npy"
        np.save(path, clustered_frame((384, 256), seed))
        frames.append(str(path))
    # No adaptation steps: the plain rewrite, exported and checked on held-out rows.
    assert main(["densify", str(model_dir), *frames, "--steps", "0", "--no-int8"]) == 0
    out = capsys.readouterr().out
    assert "dense agrees with window by window on" in out and "Bulk" in out
    assert (model_dir / "dense" / "dense16.onnx").is_file()
    assert main(["map", str(model_dir), frames[0], "--out", str(tmp_path / "m")]) == 0
    assert "dense, native stride 16" in capsys.readouterr().out
    code = main(["map", str(density_model_dir), frames[0], "--out", str(tmp_path / "w"),
                 "--mode", "dense"])  # fmt: skip
    assert code == 1
    assert "error:" in capsys.readouterr().err


def test_match_density_carries_the_threshold_to_the_dense_scale():
    """Dense embeddings that are the window ones scaled: the same windows are unknown."""
    from defectscope.artifacts.density import FeatureDensity, fit_density
    from defectscope.training.distill import match_density

    rng = np.random.default_rng(0)
    train = rng.normal(size=(400, 8)) + np.repeat([[0.0] * 8, [40.0] * 8], 200, axis=0)
    labels = np.repeat([0, 1], 200)
    density = fit_density(train, labels, 2, rng.normal(size=(100, 8))).to_dict()
    # Windows at every distance from class 0; the dense ones the same, 1.3x farther.
    window = rng.normal(size=(400, 8)) * rng.uniform(0.3, 3.0, (400, 1))
    dense = window * 1.3
    matched = FeatureDensity.from_dict(match_density(density, window, dense))
    original = FeatureDensity.from_dict(density)
    _, u_window, k_window = original.score(window)
    _, u_dense, k_dense = matched.score(dense)
    assert np.mean(k_window == k_dense) >= 0.99
    assert np.abs(u_window - u_dense).max() <= 0.05
    assert "quantile-matched" in matched.source


# --- TensorRT dense engines -------------------------------------------------------


def test_dense_profile_spans_one_window_to_the_largest_crop():
    from defectscope.export.onnx import ExportError
    from defectscope.export.tensorrt import dense_profile

    dense = {"align": 16, "margin": 90}
    assert dense_profile(dense, 64, 1536) == (64, 512, 1536)
    assert dense_profile(dense, 64, 272) == (64, 272, 272)
    with pytest.raises(ExportError, match="multiple of 16"):
        dense_profile(dense, 64, 1000)
    with pytest.raises(ExportError, match="at least 272"):
        dense_profile(dense, 64, 256)


def test_tensorrt_dense_engines_map_like_onnx_runtime(dense_model_dir, tmp_path, fake_gpu):
    """The TensorRT code path on a stand-in: same crops rule, buffers, shapes and maps."""
    model_dir = tmp_path / "model"
    shutil.copytree(dense_model_dir[0], model_dir)
    assert main(["export", str(model_dir), "--format", "tensorrt"]) == 0
    assert main(["export", str(model_dir), "--format", "tensorrt", "--dense",
                 "--max-side", "320"]) == 0  # fmt: skip
    engine_path = model_dir / "dense" / "dense16.fp16.engine"
    sidecar = json.loads((model_dir / "dense" / "dense16.fp16.engine.json").read_text())
    assert sidecar["max_side"] == 320 and sidecar["dense"]["native_stride"] == 16
    frame = clustered_frame((400, 368), 41)
    with (
        Detector.load(model_dir, backend="tensorrt") as gpu,
        Detector.load(model_dir, backend="onnxruntime") as cpu,
    ):
        assert [d.name for d in gpu.dense_engines] == ["tensorrt-dense"]
        assert gpu.dense_engines[0].path == engine_path
        maps = {
            (name, mode): det.map(frame, stride=16, mode=mode)
            for name, det in (("gpu", gpu), ("cpu", cpu))
            for mode in ("dense", "window")
        }
    for mode in ("dense", "window"):
        a, b = maps["gpu", mode], maps["cpu", mode]
        assert a.info["mode"] == mode
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
        assert np.array_equal(a.labels, b.labels)
        assert np.array_equal(a.unknown, b.unknown)
    for det in (gpu, cpu):
        for engine in (det.engine, *det.dense_engines):
            assert engine.mc_dropout is not None and engine.head_ensemble is not None
    (dense,) = [e for e in fake_gpu.engines if "frame" in e.inputs]
    assert dense.profile["frame"] == ((1, 1, 64, 64), (1, 1, 320, 320), (1, 1, 320, 320))
    # A 400x368 frame does not fit one 320 crop: several regions, none beyond the profile.
    regions = dense.seen_shapes[1:]  # the first is the largest shape, to size the buffers
    assert len(regions) >= 4 and max(max(s[2:]) for s in regions) <= 320
    # Where TensorRT is importable, auto takes the TensorRT engines.
    with Detector.load(model_dir) as auto:
        assert auto.engine.name == "tensorrt"
        assert [d.name for d in auto.dense_engines] == ["tensorrt-dense"]


def test_tensorrt_dense_int8_is_built_from_the_symmetric_graph(
    density_model_dir, tmp_path, fake_gpu, capsys
):
    import onnx
    from onnx import numpy_helper

    model_dir = tmp_path / "model"
    shutil.copytree(density_model_dir, model_dir)
    path = tmp_path / "f.npy"
    np.save(path, clustered_frame((384, 256), 3))
    assert main(["densify", str(model_dir), str(path), "--steps", "0"]) == 0
    folder = model_dir / "dense"
    graph = onnx.load(str(folder / "dense16.int8.trt.onnx")).graph
    zero_points = [
        numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("zero_point")
    ]
    # Symmetric: every zero point 0, activations and weights signed 8-bit (biases int32).
    assert zero_points and not any(z.any() for z in zero_points)
    assert {z.dtype for z in zero_points} <= {np.dtype(np.int8), np.dtype(np.int32)}
    assert np.dtype(np.int8) in {z.dtype for z in zero_points}
    assert main(["export", str(model_dir), "--format", "tensorrt", "--dense",
                 "--precision", "int8"]) == 0  # fmt: skip
    sidecar = json.loads((folder / "dense16.int8.engine.json").read_text())
    assert sidecar["precision"] == "int8" and sidecar["target"] == "tensorrt"
    (folder / "dense16.int8.trt.onnx").unlink()
    assert main(["export", str(model_dir), "--format", "tensorrt", "--dense",
                 "--precision", "int8"]) == 1  # fmt: skip
    assert "densify" in capsys.readouterr().err


@pytest.mark.skipif(not tensorrt_available()[0], reason=tensorrt_available()[1] or "n/a")
def test_tensorrt_dense_engine_on_the_gpu(dense_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(dense_model_dir[0], model_dir)
    assert main(["export", str(model_dir), "--format", "tensorrt"]) == 0
    assert main(["export", str(model_dir), "--format", "tensorrt", "--dense"]) == 0
    frame = clustered_frame((512, 512), 42)
    with (
        Detector.load(model_dir, backend="tensorrt") as gpu,
        Detector.load(model_dir, backend="onnxruntime") as cpu,
    ):
        a, b = gpu.map(frame, stride=16), cpu.map(frame, stride=16)
    assert a.info["mode"] == "dense" and a.info.get("precision") == "fp16"
    assert np.mean(a.labels == b.labels) >= 0.98
    assert np.abs(a.probabilities - b.probabilities).max() < 0.05


# --- dense graphs bound to their model (issue 25, findings 1, 9 and 11) ------------


def _other_model(target, like) -> None:
    """Untrained weights with the configuration (classes, patch size) of model ``like``."""
    from defectscope.nets.checkpoint import load_checkpoint, save_checkpoint

    _, config, _ = load_checkpoint(like)
    torch.manual_seed(123)
    other = build_model(len(config.classes), patch_size=config.patch_size,
                        embedding_dim=config.embedding_dim,
                        architecture=config.architecture)  # fmt: skip
    save_checkpoint(target, other.eval(), config)


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_make_dense_binds_the_folder_to_the_weights(dense_model_dir):
    model_dir, record = dense_model_dir
    assert record["weights_sha256"] == _sha256(model_dir / "weights.pt")
    folder = model_dir / "dense"
    assert record["files"] == {
        p.name: _sha256(p) for p in folder.iterdir() if p.name != "dense.json"
    }
    assert DenseEngine(folder / "dense16.onnx").weights_sha256 == record["weights_sha256"]
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".dense")]


def test_dense_graphs_of_another_model_are_refused(dense_model_dir, tmp_path, caplog):
    """Before: another model's dense/ (same classes) mapped in dense mode, agreement 0.024."""
    import logging

    from defectscope.artifacts.provenance import ProvenanceError

    source = dense_model_dir[0]
    other = tmp_path / "other"
    _other_model(other, source)
    shutil.copytree(source / "dense", other / "dense")
    want, got = _sha256(source / "weights.pt"), _sha256(other / "weights.pt")
    with caplog.at_level(logging.WARNING):
        assert find_dense_all(other) == []
    assert any(want in r.getMessage() and got in r.getMessage() for r in caplog.records)
    with pytest.raises(ProvenanceError) as caught:
        find_dense_all(other, strict=True)
    assert want in str(caught.value) and got in str(caught.value)
    with pytest.raises(ProvenanceError, match=got):
        DenseEngine(other / "dense" / "dense16.onnx")
    frame = clustered_frame((160, 160), 43)
    with Detector.load(other) as det:
        assert det.dense_engines == []
        assert det.map(frame, stride=16).info["mode"] == "window"


def test_replaced_weights_map_with_themselves(dense_model_dir, tmp_path):
    """Before: weights.pt (and model.json) replaced, the old model.onnx and dense/ answered."""
    source = dense_model_dir[0]
    replaced = tmp_path / "replaced"
    shutil.copytree(source, replaced)
    _other_model(tmp_path / "new", source)
    for name in ("weights.pt", "model.json"):
        shutil.copy(tmp_path / "new" / name, replaced / name)
    frame = clustered_frame((160, 160), 44)
    with Detector.load(replaced) as det, Detector.load(tmp_path / "new") as own:
        assert det.engine.name == "torch" and det.dense_engines == []
        mapped, reference = det.map(frame, stride=16), own.map(frame, stride=16)
    assert mapped.info["mode"] == "window"
    np.testing.assert_allclose(mapped.probabilities, reference.probabilities, atol=1e-6)


def test_an_unfinished_or_changed_dense_folder_is_not_loaded(dense_model_dir, tmp_path, caplog):
    """Before: dense16.onnx without dense.json (a densify that failed) was used by map."""
    import logging

    from defectscope.artifacts.provenance import ProvenanceError
    from defectscope.engines.base import EngineError

    model_dir = tmp_path / "model"
    shutil.copytree(dense_model_dir[0], model_dir)
    (model_dir / "dense" / "dense.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert find_dense_all(model_dir) == []
    assert any("densify did not finish" in r.getMessage() for r in caplog.records)
    with pytest.raises(EngineError, match="densify did not finish"):
        find_dense_all(model_dir, strict=True)
    # A graph that is not the one dense.json lists (edited, or copied over) is refused.
    shutil.copy(dense_model_dir[0] / "dense" / "dense.json", model_dir / "dense" / "dense.json")
    assert find_dense_all(model_dir) == [model_dir / "dense" / "dense16.onnx"]
    with open(model_dir / "dense" / "dense16.onnx", "ab") as handle:
        handle.write(b"\0")
    assert find_dense_all(model_dir) == []
    with pytest.raises(ProvenanceError, match="changed since densify made it"):
        find_dense_all(model_dir, strict=True)


def _edit_dense_metadata(source, target, **changes) -> None:
    import onnx

    from defectscope.artifacts.metadata import METADATA_KEY

    proto = onnx.load(str(source))
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            record = json.loads(entry.value)
            record["dense"].update(changes)
            entry.value = json.dumps(record)
    onnx.save(proto, str(target))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"native_stride": 8}, "align 16 does not match native_stride 8"),
        # Before: an IndexError on map --stride 32; then a map on the wrong grid.
        ({"native_stride": 8, "align": 8}, "native stride 16"),
        ({"native_stride": 32, "align": 32}, "native stride 16"),
        ({"native_stride": 32}, "align 16 does not match native_stride 32"),
        ({"box": 2}, "box 2 differs from the patch size 64"),  # before: a wrong map
        ({"margin": 10}, r"margin 10 differs from the vgg16(_bn)? receptive margin 90"),
        ({"native_stride": "16"}, "native_stride must be an integer"),
        ({"box": 64.5}, "box must be an integer"),
        ({"native_stride": 12}, "native_stride must be one of"),
    ],
)
def test_edited_dense_metadata_is_refused(dense_model_dir, tmp_path, changes, message):
    from defectscope.engines.base import EngineError

    target = tmp_path / "edited.onnx"
    _edit_dense_metadata(dense_model_dir[0] / "dense" / "dense16.onnx", target, **changes)
    with pytest.raises(EngineError, match=message) as caught:
        DenseEngine(target)
    assert "\n" not in str(caught.value)


def test_edited_dense_graph_in_a_model_maps_window_by_window(dense_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(dense_model_dir[0], model_dir)
    graph = model_dir / "dense" / "dense16.onnx"
    _edit_dense_metadata(dense_model_dir[0] / "dense" / "dense16.onnx", graph, native_stride=8)
    frame = clustered_frame((224, 224), 45)
    with Detector.load(model_dir) as det:
        assert det.map(frame, stride=32).info["mode"] == "window"
    with pytest.raises(ValueError, match=r"dense16\.onnx|no dense graphs"):
        Detector.load(model_dir, dense=True)


def test_receptive_margins_follow_from_the_layers():
    from defectscope.engines.dense import RECEPTIVE_MARGINS

    for architecture, margin in RECEPTIVE_MARGINS.items():
        assert receptive_margin(build_model(2, architecture=architecture), 64) == margin


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((63, 300), np.uint8), r"check frame 1: shape \(63, 300\) is smaller than 64"),
        (np.full((128, 128), np.nan, np.float32), "check frame 1: holds non-finite values"),
        (np.zeros((2, 128, 128), np.uint8), "check frame 1: frame must be 2-D"),
    ],
)
def test_densify_checks_its_frames_before_any_work(
    density_model_dir, tmp_path, monkeypatch, frame, message
):
    """Before: the check frame failed after the work, leaving dense16.onnx without dense.json."""
    import defectscope.export.dense as dense_module

    def no_work(*args, **kwargs):
        raise AssertionError("densify started working before checking its frames")

    monkeypatch.setattr(dense_module, "distill_dense", no_work)
    model_dir = tmp_path / "model"
    shutil.copytree(density_model_dir, model_dir)
    good = clustered_frame((256, 256), 1)
    with pytest.raises(ValueError, match=message):
        make_dense(model_dir, [good], [frame], steps=0, int8=False, progress=False)
    holes = good.astype(np.float32)
    holes[3, 4] = np.nan
    with pytest.raises(ValueError, match="frame 2: holds non-finite"):
        make_dense(model_dir, [good, holes], steps=0, int8=False, progress=False)
    with pytest.raises(ValueError, match=r"frame 1: shape \(90, 256\) is smaller than 96"):
        make_dense(model_dir, [good[:90]], steps=0, int8=False, progress=False)
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(
        p.name for p in density_model_dir.iterdir()
    )


def test_a_failed_densify_keeps_the_previous_folder_whole(dense_model_dir, tmp_path, monkeypatch):
    """The folder is made aside and renamed at the end: a failure leaves the old one as it was."""
    import defectscope.export.dense as dense_module

    model_dir = tmp_path / "model"
    shutil.copytree(dense_model_dir[0], model_dir)
    before = {p.name: _sha256(p) for p in (model_dir / "dense").iterdir()}

    def fails(*args, **kwargs):
        raise RuntimeError("stopped while checking agreement")

    monkeypatch.setattr(dense_module, "measure_agreement", fails)
    frame = acquired_frame((224, 224), 3)[0]
    with pytest.raises(RuntimeError, match="stopped"):
        make_dense(model_dir, [frame], [frame], steps=0, int8=False, progress=False)
    assert {p.name: _sha256(p) for p in (model_dir / "dense").iterdir()} == before
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".")]


def test_dense_files_and_folders_have_the_umask_modes(dense_model_dir):
    """Before: dense.pt was written 0600 (a temporary file's mode), unreadable to others."""
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    folder = dense_model_dir[0] / "dense"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path.name
