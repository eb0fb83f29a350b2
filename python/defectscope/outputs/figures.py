"""Figures of maps, clustering and the run report.

Figures are made as ``matplotlib.figure.Figure`` objects and written with the Agg
canvas, never through pyplot: importing this module leaves matplotlib's backend and
global state alone, so it is safe inside a GUI host (Nion Swift, napari).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.lines
import numpy as np
from matplotlib.figure import Figure


def subplots(*args, figsize=(6.4, 4.8), dpi=100, **kwargs):
    """``(figure, axes)`` like ``pyplot.subplots``, without pyplot's global figure list."""
    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(*args, **kwargs)


def tab10(index: int) -> tuple:
    return matplotlib.colormaps["tab10"](index % 10)


def plain_text(text: str) -> str:
    """``text`` shown literally: a ``$`` would start matplotlib's mathtext."""
    return str(text).replace("$", r"\$")


def save(fig, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def silhouette_curve(scores: dict[int, float], chosen: int, path: str | Path) -> Path:
    """Silhouette score against k, the chosen k marked."""
    fig, ax = subplots(figsize=(5, 3.5))
    ks = sorted(scores)
    ax.plot(ks, [scores[k] for k in ks], "o-", color="tab:blue")
    ax.axvline(chosen, color="tab:red", linestyle="--", label=f"chosen k = {chosen}")
    ax.set_xlabel("k (clusters)")
    ax.set_ylabel("silhouette score")
    ax.legend()
    return save(fig, path)


def pca_scatter(
    coords: np.ndarray,
    clusters: np.ndarray,
    path: str | Path,
    labels: np.ndarray | None = None,
    label_names: list[str] | None = None,
) -> Path:
    """First two PCA components coloured by cluster (and by label, side by side, if given)."""
    panels = 2 if labels is not None else 1
    fig, axes = subplots(1, panels, figsize=(5 * panels, 4.2), squeeze=False)
    y = coords[:, 1] if coords.shape[1] > 1 else np.zeros(len(coords))
    ax = axes[0, 0]
    scatter = ax.scatter(coords[:, 0], y, c=clusters, cmap="tab10", s=6)
    ax.legend(*scatter.legend_elements(), title="cluster", fontsize=7, loc="best")
    ax.set_title("coloured by cluster")
    if labels is not None:
        ax = axes[0, 1]
        for i, name in enumerate(label_names or []):
            mask = labels == i
            ax.scatter(coords[mask, 0], y[mask], s=6, label=plain_text(name), color=tab10(i))
        ax.legend(fontsize=7, loc="best", markerscale=2)
        ax.set_title("coloured by label")
    for ax in axes[0]:
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    return save(fig, path)


def montage(
    patches: np.ndarray, clusters: np.ndarray, path: str | Path, per_cluster: int = 8, seed: int = 0
) -> Path:
    """A row of example patches per cluster."""
    rng = np.random.default_rng(seed)
    ks = np.unique(clusters)
    fig, axes = subplots(
        len(ks), per_cluster, figsize=(per_cluster * 1.1, len(ks) * 1.2), squeeze=False
    )
    for row, k in enumerate(ks):
        members = np.flatnonzero(clusters == k)
        chosen = rng.choice(members, size=min(per_cluster, len(members)), replace=False)
        for col in range(per_cluster):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col < len(chosen):
                ax.imshow(patches[chosen[col]], cmap="gray")
            if col == 0:
                ax.set_ylabel(f"{k} (n={len(members)})", fontsize=8)
    return save(fig, path)


def grid_map(
    frame: np.ndarray, values: np.ndarray, rows: np.ndarray, cols: np.ndarray, path, title: str
) -> Path:
    """Frame with a categorical per-window map laid over it (pixel -> nearest window).

    A legend of one patch per category, drawn with the map's own colour and alpha,
    says which colour is which; category borders are outlined.
    """
    from matplotlib.patches import Patch

    k = int(values.max()) + 1
    palette = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
    colors = np.array([palette(i % palette.N) for i in range(k)])
    alpha = 0.5
    pixels = values[np.ix_(rows, cols)]
    fig, ax = subplots(figsize=(7, 7 * frame.shape[0] / frame.shape[1] + 0.5))
    ax.imshow(frame, cmap="gray")
    rgba = colors[pixels].copy()
    rgba[..., 3] = alpha
    ax.imshow(rgba, interpolation="nearest")
    if k > 1:
        ax.contour(pixels, levels=np.arange(k - 1) + 0.5, colors="white", linewidths=0.5)
    handles = [
        Patch(facecolor=colors[i], alpha=alpha, edgecolor="black", label=f"cluster {i}")
        for i in range(k)
    ]
    ax.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False
    )
    ax.set_axis_off()
    ax.set_title(title)
    return save(fig, path)


def training_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Loss and accuracy per epoch, training and validation."""
    fig, (a, b) = subplots(1, 2, figsize=(9, 3.3))
    epochs = [h["epoch"] for h in history]
    for key, ax in (("loss", a), ("accuracy", b)):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], ".-", label="train")
        if history and f"val_{key}" in history[0]:
            ax.plot(epochs, [h[f"val_{key}"] for h in history], ".-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.legend()
    fig.suptitle(title)
    return save(fig, path)


def confusion(matrix: list[list[int]], classes: list[str], path: str | Path, title: str) -> Path:
    m = np.asarray(matrix)
    fig, ax = subplots(figsize=(1.0 + 0.6 * len(classes), 0.8 + 0.55 * len(classes)))
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
    names = [plain_text(c) for c in classes]
    ax.set_xticks(range(len(classes)), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(classes)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return save(fig, path)


def reliability(bins: dict, path: str | Path, title: str) -> Path:
    """Reliability diagram: accuracy against confidence per bin, before and after T."""
    fig, ax = subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "k:", label="perfect")
    for key, style in (("before", "o-"), ("after", "s-")):
        data = bins.get(key)
        if data:
            ax.plot(data["confidence"], data["accuracy"], style, label=f"{key} scaling")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save(fig, path)


def class_colors(classes: list[str], background: str | None) -> dict[str, tuple]:
    """A colour per class: gray for the background, tab10 for the defect classes."""
    colors, k = {}, 0
    for name in classes:
        if name == background:
            colors[name] = (0.6, 0.6, 0.6, 1.0)
        else:
            colors[name] = tab10(k)
            k += 1
    return colors


def _frame_axes(ax, frame: np.ndarray, result) -> None:
    """The frame in gray with pixel axes and, when calibrated, a scale bar in its unit."""
    ax.imshow(frame, cmap="gray", interpolation="nearest")
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    calibration = getattr(result, "calibration", None)
    if calibration is None or calibration.scale[1] <= 0:
        return
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    # A round length near a fifth of the frame's width.
    width = frame.shape[1] * calibration.scale[1]
    length = 10 ** np.floor(np.log10(width / 5))
    length *= max((m for m in (1, 2, 5) if m * length <= width / 4), default=1)
    bar = AnchoredSizeBar(
        ax.transData,
        length / calibration.scale[1],
        f"{length:g} {calibration.unit}",
        "lower left",
        pad=0.5,
        color="white",
        frameon=False,
        size_vertical=max(frame.shape[0] / 150, 1),
    )
    ax.add_artist(bar)


def map_note(result) -> str:
    """What a map's title must add: the resampling factor when the frame was resampled
    for the model, and the frame's unknown share when it is out of distribution."""
    notes = []
    scale = float(getattr(result, "scale", 1.0))
    if scale != 1.0:
        notes.append(f"resampled x{scale:.3g} for the model")
    if getattr(result, "out_of_distribution", False):
        # The share past the threshold: the windows' own, or the density's check.
        share = max(result.unexplained_share, getattr(result, "ood_check_share", None) or 0.0)
        notes.append(
            f"FRAME OUT OF DISTRIBUTION: {100 * share:.0f} % of windows "
            "unknown away from any known defect"
        )
    return "\n" + "; ".join(notes) if notes else ""


def map_overlay(frame: np.ndarray, result, path: str | Path, rois: list[dict] | None = None):
    """Frame in gray with defect classes coloured (alpha by confidence), region boxes,
    numbered ROI markers, hatched unknown windows, a legend of every class and, when
    the frame is calibrated, a scale bar.

    Pixels take the nearest window's values and region boxes span their windows, both
    in the original frame's pixels (windows ``result.window_size`` wide); the title
    says when the frame was resampled or is out of distribution (:func:`map_note`)."""
    from matplotlib.patches import Patch, Rectangle

    from defectscope.maps.result import pixel_grid_index

    rows, cols = pixel_grid_index(result)
    labels = result.labels[np.ix_(rows, cols)]
    confidence = result.confidence[np.ix_(rows, cols)]
    colors = class_colors(result.classes, result.background)
    palette = np.array([colors[c] for c in result.classes])
    rgba = palette[labels].copy()
    rgba[..., 3] = 0.55 * confidence
    if result.background is not None:
        rgba[labels == result.classes.index(result.background), 3] = 0.0
    height, width = frame.shape
    fig, ax = subplots(figsize=(8, 8 * height / width + 0.6), dpi=110)
    _frame_axes(ax, frame, result)
    ax.imshow(rgba, interpolation="nearest")
    handles = [
        Patch(
            facecolor="none" if c == result.background else colors[c],
            edgecolor="gray",
            label=plain_text(c) + (" (background, not coloured)" if c == result.background else ""),
        )
        for c in result.classes
    ]
    if result.unknown is not None and result.unknown.any():
        unknown = result.unknown[np.ix_(rows, cols)].astype(float)
        ax.contourf(unknown, levels=[0.5, 1.5], colors="none", hatches=["////"])
        ax.contour(unknown, levels=[0.5], colors="white", linewidths=0.8)
        handles.append(Patch(facecolor="none", edgecolor="black", hatch="////", label="unknown"))
    for region in result.regions():
        y0, x0, y1, x1 = region["bbox"]
        edge = "white" if region.get("unknown") else colors.get(region["label"], "white")
        ax.add_patch(
            Rectangle(
                (x0 - 0.5, y0 - 0.5),
                x1 - x0,
                y1 - y0,
                fill=False,
                edgecolor=edge,
                linewidth=1.0,
                linestyle="--" if region.get("unknown") else "-",
            )
        )
    for roi in rois or []:
        cy, cx = roi["center"]
        ax.plot(cx, cy, marker="o", markersize=12, markerfacecolor="none", color="yellow")
        ax.annotate(
            str(roi["rank"]),
            (cx, cy),
            xytext=(7, 7),
            textcoords="offset points",
            color="yellow",
            fontsize=9,
            fontweight="bold",
        )
    if rois:
        handles.append(
            matplotlib.lines.Line2D(
                [],
                [],
                marker="o",
                color="yellow",
                markerfacecolor="none",
                linestyle="",
                label="ROI (rank)",
            )
        )
    handles.append(Patch(facecolor="none", edgecolor="white", label="region box"))
    ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.8)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_title(
        "defect classes (alpha = confidence; hatched: unlike the training data)" + map_note(result)
    )
    return save(fig, path, dpi=110)


def map_confidence(result, path: str | Path, frame: np.ndarray | None = None) -> Path:
    """Confidence of the predicted class, pixel by nearest window, over the frame."""
    from defectscope.maps.result import pixel_grid_index

    rows, cols = pixel_grid_index(result)
    height, width = result.frame_shape
    fig, ax = subplots(figsize=(8, 8 * height / width + 0.6), dpi=110)
    alpha = 1.0
    if frame is not None:
        _frame_axes(ax, np.asarray(frame), result)
        alpha = 0.6
    image = ax.imshow(
        result.confidence[np.ix_(rows, cols)], vmin=0, vmax=1, cmap="viridis", alpha=alpha
    )
    fig.colorbar(image, ax=ax, label="confidence of predicted class (calibrated softmax)")
    ax.set_title("confidence of the predicted class, by nearest window" + map_note(result))
    return save(fig, path, dpi=110)


def map_uncertainty(frame: np.ndarray, result, path: str | Path) -> Path:
    """Uncertainty (unlike the training data, 0..1) over the frame, unknown outlined."""
    from defectscope.maps.result import pixel_grid_index

    rows, cols = pixel_grid_index(result)
    height, width = frame.shape
    fig, ax = subplots(figsize=(8, 8 * height / width + 0.6), dpi=110)
    _frame_axes(ax, frame, result)
    image = ax.imshow(
        result.uncertainty[np.ix_(rows, cols)], vmin=0, vmax=1, cmap="magma", alpha=0.6
    )
    if result.unknown is not None and result.unknown.any():
        ax.contour(
            result.unknown[np.ix_(rows, cols)].astype(float),
            levels=[0.5],
            colors="cyan",
            linewidths=1.0,
        )
    # Every source (density, residual, MC dropout, ensemble) reads its score this way.
    fig.colorbar(image, ax=ax, label="uncertainty (share of held-out known windows scoring lower)")
    ax.set_title(
        "uncertainty; cyan outline: unknown (beyond the validation threshold)" + map_note(result)
    )
    return save(fig, path, dpi=110)
