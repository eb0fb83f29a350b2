"""Frame check."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from defectscope.io.datasets import PatchSet

# A crop counts as cut from the frame only at a near-perfect match: on a periodic lattice any
# same-phase region matches at 0.93-0.96 (SrTiO3's Extra, IExtra and Mis and CdTe's
# Vacancy_CdTe crops do so, against 1.000 for the crops really cut from the frames).
CROP_MATCH_THRESHOLD = 0.97


def frame_check(
    model_dir: Path,
    frame_path: Path,
    patches: PatchSet,
    out_dir: Path,
    stride: int = 16,
    scale: str | float = "auto",
    precision: str = "fp32",
) -> dict:
    """Map the large frame and check each class lands where its crops were cut.

    The crops are training data, so this checks that the map reproduces the labelled
    regions (localization), not that it generalizes. The frame is mapped as every map
    is (:meth:`Detector.find <defectscope.maps.detector.Detector.find>`, scale matching
    by ``scale``), on PyTorch at ``precision`` (``auto``: bf16 where the CPU has it
    natively); the report records the scale matching (``scale``) and, with a density,
    ``unknown_share`` and ``out_of_distribution``.
    """
    from defectscope.evaluation.provenance import locate_patches, recall_at_sources
    from defectscope.io.frames import read_image
    from defectscope.maps.detector import Detector
    from defectscope.maps.options import MapOptions
    from defectscope.outputs.map_files import write_map_outputs

    frame = read_image(frame_path)
    with Detector.load(model_dir, backend="torch", precision=precision) as det:
        result = det.find(frame, MapOptions(stride=stride, scale=scale)).result
        used = det.engine.precision_used
    write_map_outputs(frame, result, out_dir)
    positions, _ = locate_patches(frame, patches.images, threshold=CROP_MATCH_THRESHOLD)
    recall = recall_at_sources(result, positions, patches.labels, patches.classes)
    counts = np.bincount(result.labels.ravel(), minlength=len(result.classes))
    report = {
        "frame": str(frame_path),
        "stride": stride,
        "precision": used,
        "map_dir": str(out_dir),
        "timing_ms": result.timing_ms,
        "scale": result.info.get("scale"),
        "windows_per_class": {c: int(n) for c, n in zip(result.classes, counts, strict=True)},
        "n_regions": len(result.regions()),
        "recall_at_crop_sources": recall,
        "outside_crop_extent": outside_crop_extent(result, positions, patches.labels),
    }
    if result.unknown is not None:
        report["unknown_share"] = float(result.unknown.mean())
        report["unexplained_share"] = result.unexplained_share
        report["out_of_distribution"] = bool(result.out_of_distribution)
    return report


def outside_crop_extent(result, positions: np.ndarray, labels: np.ndarray) -> dict:
    """Per class: share of the frame's windows given that class outside its crops' extent.

    The extent is the rows and columns spanned by the class's crops located in the
    frame. A class mapped far from where any of its crops were cut (SF2 across the
    upper half of the CdTe frame) is a false alarm; counted over all windows, and over
    known windows only (unknown ones are not claimed as that class).
    """
    size = result.patch_size  # the crops' side: patches are cut at the model's patch size
    centres = result.centers
    predicted = result.labels.ravel()
    known = ~result.unknown_mask.ravel()
    report = {}
    for index, name in enumerate(result.classes):
        located = positions[(labels == index) & (positions[:, 0] >= 0)]
        mine = predicted == index
        if len(located) == 0 or not mine.any():
            continue
        (y0, x0), (y1, x1) = located.min(0), located.max(0) + size
        inside = (
            (centres[:, 0] >= y0)
            & (centres[:, 0] < y1)
            & (centres[:, 1] >= x0)
            & (centres[:, 1] < x1)
        )
        report[name] = {
            "windows": int(mine.sum()),
            "outside": float((mine & ~inside).sum() / len(predicted)),
            "outside_known": float((mine & ~inside & known).sum() / len(predicted)),
        }
    return report
