"""What the lattice residual's novelty adds to a map, same run, same frame.

``dense-int8`` maps a 512^2 frame at stride 16 with the dense INT8 graph as a model
without any novelty source does; ``+density`` with the embedding's density (every
trained model has one), ``+density+residual`` as ``novelty="embedding+residual"`` maps;
``dense-int8+residual`` maps it with the lattice-residual density alone
(every window's residual descriptors and density score,
:mod:`defectscope.artifacts.residual_density`); ``dense-int8+mc_dropout`` maps it with
``novelty="mc_dropout"`` (the embeddings gathered and 128 thinned heads scored,
:class:`~defectscope.artifacts.disagreement.DropoutNovelty`), ``dense-int8+ensemble``
with ``novelty="ensemble"`` (five heads of 256 hidden units on the embedding,
:class:`~defectscope.artifacts.disagreement.EnsembleNovelty`),
``dense-int8+mc_dropout+residual`` and ``dense-int8+ensemble+residual`` with
``novelty="mc_dropout+residual"`` and ``"ensemble+residual"`` (each with the lattice
residual). The cases with MC dropout or the ensemble carry the embedding's density too,
as a trained model does: it checks the frame as a whole. ``residual-only`` times the
residual scoring of the frame's 841 windows alone. The issue's goal: the default within
1.5x of the dense INT8 map with the density alone (``+density``). The default is
``+ensemble+residual`` for a model that carries the head ensemble (every model trained
since it exists; ``novelty="auto"``) and ``+density+residual`` for one trained before.
The CPU is recorded with each result.

Run::

    .venv/bin/python -m pytest benchmarks/bench_novelty.py \\
        --benchmark-json=benchmarks/results/novelty.json
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.frames import stem_frame
from defectscope.artifacts.density import fit_density
from defectscope.artifacts.disagreement import (
    HeadMember,
    fit_dropout_novelty,
    fit_ensemble_novelty,
)
from defectscope.artifacts.residual_density import fit_residual_density
from defectscope.maps.detector import Detector
from defectscope.simulate.lattice import toy_patch_set
from defectscope.tiling.tiler import window_origins
from defectscope.util.system import cpu_description

SIZE, STRIDE = 512, 16


@pytest.fixture(scope="module")
def residual_density():
    """A residual density of toy lattice patches (speed does not depend on its fit)."""
    train, held = toy_patch_set(30, 0, 0.05), toy_patch_set(20, 1, 0.05)
    return fit_residual_density(train.images, train.labels, 7, held.images)


def dropout_novelty(classes: int, width: int):
    """MC dropout of a random head (speed does not depend on its weights)."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(classes, width)).astype(np.float32)
    held = np.maximum(rng.normal(size=(200, width)), 0).astype(np.float32)
    return fit_dropout_novelty(weight, np.zeros(classes, np.float32), 0.5, held)


def ensemble_novelty(classes: int, width: int, members: int = 5, hidden: int = 256):
    """A head ensemble of random heads, as train() records it (speed does not depend
    on its weights)."""
    rng = np.random.default_rng(2)
    heads = [
        HeadMember(
            (rng.normal(size=(hidden, width)) / np.sqrt(width)).astype(np.float32),
            np.zeros(hidden, np.float32),
            (rng.normal(size=(classes, hidden)) / np.sqrt(hidden)).astype(np.float32),
            np.zeros(classes, np.float32),
        )
        for _ in range(members)
    ]
    held = np.maximum(rng.normal(size=(200, width)), 0).astype(np.float32)
    return fit_ensemble_novelty(heads, held)


def embedding_density(classes: int, width: int):
    """A feature density of random embeddings (speed does not depend on its fit)."""
    rng = np.random.default_rng(1)
    embeddings = np.maximum(rng.normal(size=(700, width)), 0).astype(np.float32)
    return fit_density(embeddings, rng.integers(0, classes, 700), classes, embeddings[:200])


@pytest.mark.parametrize(
    "impl",
    [
        "dense-int8",
        "dense-int8+density",
        "dense-int8+residual",
        "dense-int8+density+residual",
        "dense-int8+mc_dropout",
        "dense-int8+ensemble",
        "dense-int8+mc_dropout+residual",
        "dense-int8+ensemble+residual",
    ],
)
def test_map_with_and_without_residual(benchmark, bench_dense_model, residual_density, impl):
    frame = stem_frame(SIZE)
    benchmark.group = f"novelty {SIZE}^2 stride {STRIDE}"
    benchmark.extra_info["cpu"] = cpu_description()
    sources = impl.split("+")[1:]
    recorded = [s for s in sources if s in ("mc_dropout", "ensemble")]
    novelty = recorded[0] if recorded else "auto"
    carried = set(sources)
    if recorded:
        # A trained model also carries the embedding's density: it checks the frame.
        carried.add("density")
        if "residual" in sources:
            novelty += "+residual"
    with Detector.load(bench_dense_model, dense=True) as det:
        # What a model trained with them carries in every graph.
        for engine in (det.engine, *det.dense_engines):
            width = engine.config.embedding_dim
            if "density" in carried:
                engine.density = embedding_density(len(engine.classes), width)
            if "residual" in carried:
                engine.residual_density = residual_density
            if "mc_dropout" in carried:
                engine.mc_dropout = dropout_novelty(len(engine.classes), width)
            if "ensemble" in carried:
                engine.head_ensemble = ensemble_novelty(len(engine.classes), width)
        kwargs = {"stride": STRIDE, "keep_embeddings": False, "mode": "dense", "novelty": novelty}
        det.map(frame, **kwargs)  # warm
        result = benchmark.pedantic(det.map, args=(frame,), kwargs=kwargs, rounds=3)
    assert result.info["mode"] == "dense"
    names = {
        "density": "embedding",
        "residual": "lattice residual",
        "mc_dropout": "MC dropout",
        "ensemble": "head ensemble",
    }
    assert result.info["novelty"] == [names[s] for s in sources]
    benchmark.extra_info.update(windows=int(np.prod(result.grid_shape)))


def test_residual_scoring_alone(benchmark, residual_density):
    frame = stem_frame(SIZE).astype(np.float32)
    origins = window_origins(frame.shape, 64, STRIDE)
    windows = np.stack([frame[r : r + 64, c : c + 64] for r, c in origins])
    benchmark.group = f"novelty {SIZE}^2 stride {STRIDE}"
    benchmark.extra_info.update(cpu=cpu_description(), windows=len(windows))
    distance, _, _ = benchmark.pedantic(residual_density.score, args=(windows,), rounds=3)
    assert distance.shape == (len(windows),)
