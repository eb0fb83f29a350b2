"""One self-contained HTML report of a run directory (figures embedded as data URIs).

Reads what the other commands wrote under a run directory: ``study.json`` and the
two model directories (training curves, tables, confusion matrices, calibration),
``frame_map/`` (defect-map overlay), ``cluster/`` (silhouette curve, PCA, montage)
and ``rois.json``. Missing parts are reported as missing, not silently dropped.
"""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from pathlib import Path

from defectscope.evaluation.metrics import LOCO_SCORES, format_mean_std
from defectscope.io.files import atomic_write_text
from defectscope.maps.scale import describe
from defectscope.outputs import figures

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.3em 0; }
.missing { color: #a33; font-style: italic; }
.warning { border: 2px solid #c60; background: #fff4e5; padding: 0.4em 1em; margin: 1em 0; }
.grid { display: flex; flex-wrap: wrap; gap: 1em; }
.grid > div { flex: 1 1 45%; }
"""


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return f'<p class="missing">{html.escape(alt)}: not found ({html.escape(path.name)})</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.2e}" if 0 < abs(v) < 1e-3 else f"{v:.3f}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _study_section(run: Path, study: dict, scratch: Path) -> list[str]:
    parts = [
        "<h2>Evaluation: random versus grouped split</h2>",
        f"<p>{study['n_patches']} patches in {study['n_groups']} independent groups "
        f"(overlap threshold {study['overlap_threshold']}). The random split tests on "
        "near-copies of training crops; the grouped split on regions never trained on.</p>",
    ]
    grouped, rnd = study["grouped"], study["random"]
    evaluable = grouped["split"]["evaluable_classes"]
    rows = []
    for c in study["classes"]:
        g = grouped["metrics"]["per_class"][c]
        rows.append(
            [
                c,
                study["counts"][c],
                study["groups_per_class"][c],
                rnd["metrics"]["per_class"][c]["f1"],
                g["f1"] if c in evaluable else "not evaluable",
            ]
        )
    parts.append(_table(["class", "patches", "groups", "random F1", "grouped F1"], rows))
    rows = []
    for name, part in (("random", rnd), ("grouped", grouped)):
        m, cal = part["metrics"], part["calibration"]
        rows.append(
            [
                name,
                part["split"]["n_test"],
                m["accuracy"],
                m["macro_f1"],
                cal["ece_before"],
                cal["ece_after"],
                cal["temperature"],
            ]
        )
    parts.append(
        _table(
            [
                "split",
                "test patches",
                "accuracy",
                "macro-F1",
                "ECE before",
                "ECE after",
                "temperature",
            ],
            rows,
        )
    )
    sym = grouped.get("test_time_symmetry")
    if sym:
        parts.append(
            "<p>Test-time symmetry (D4: the mean over the eight rotations and reflections of "
            f"each patch) on the grouped test split: accuracy {sym['accuracy_none']:.3f} "
            f"&rarr; {sym['accuracy_d4']:.3f}, ECE {sym['ece_none']:.3f} &rarr; "
            f"{sym['ece_d4']:.3f}, at {sym['seconds_d4'] / max(sym['seconds_none'], 1e-9):.1f}"
            "&times; the inference time.</p>"
        )
    cv = study.get("cross_validation")
    if cv:
        parts.append(
            f"<h3>Grouped {cv['n_folds']}-fold cross-validation</h3><p>Each independent "
            "group is tested exactly once; mean ± standard deviation over folds.</p>"
        )
        rows = [
            [c, m["f1"]["n"], m["support"], format_mean_std(m["f1"]), format_mean_std(m["recall"])]
            for c, m in cv["per_class"].items()
        ]
        parts.append(_table(["class", "folds tested", "test patches", "F1", "recall"], rows))
        parts.append(
            _table(
                ["accuracy", "macro-F1", "ECE before", "ECE after"],
                [
                    [
                        format_mean_std(cv[k])
                        for k in ("accuracy", "macro_f1", "ece_before", "ece_after")
                    ]
                ],
            )
        )
    loco = study.get("leave_one_class_out")
    if loco:
        parts.append(
            "<h3>Leave one class out</h3><p>A model trained without the class; AUROC of "
            "&ldquo;the class is unknown&rdquo; against grouped held-out patches of the "
            "trained classes, by the embedding's feature density, the lattice residual's "
            "density, the two combined (<code>--novelty embedding+residual</code>), Monte "
            "Carlo dropout in the head, an ensemble of heads on the shared trunk's "
            "features, one on the embedding (what maps use with <code>--novelty "
            "ensemble</code>), MC dropout and that ensemble each with the lattice residual "
            "(<code>--novelty mc_dropout+residual</code>, and <code>ensemble+residual</code>, "
            "the default), and the softmax alone.</p>"
        )
        keys = [f"auroc_{key}" for _, key in LOCO_SCORES]
        rows = [
            [c, "skipped: " + r["skipped"], *[""] * (len(keys) + 2)]
            if "skipped" in r
            else [
                c,
                r["n_novel"],
                *[r.get(key, "–") for key in keys],
                r["novel_unknown"],
                r["known_unknown"],
            ]
            for c, r in loco.items()
        ]
        header = ["left out", "its patches", *[f"AUROC {name}" for name, _ in LOCO_SCORES]]
        parts.append(_table([*header, "left-out unknown", "known unknown"], rows))
    parts.append('<div class="grid">')
    for name, part in (("random", rnd), ("grouped", grouped)):
        cm = figures.confusion(
            part["metrics"]["confusion"],
            study["classes"],
            scratch / f"cm_{name}.png",
            f"confusion, {name} split (test)",
        )
        parts.append(f"<div><h3>{name} split</h3>{_img(cm, f'confusion {name}')}")
        reliability = part["calibration"].get("reliability")
        if reliability:
            fig = figures.reliability(
                reliability, scratch / f"rel_{name}.png", f"calibration, {name} split"
            )
            parts.append(_img(fig, f"reliability {name}"))
        model = _read_json(Path(part["model_dir"]) / "model.json") or _read_json(
            run / ("model" if name == "grouped" else "model_random") / "model.json"
        )
        if model and model.get("history"):
            fig = figures.training_curves(
                model["history"], scratch / f"train_{name}.png", f"training, {name} split"
            )
            parts.append(_img(fig, f"training curves {name}"))
        parts.append("</div>")
    parts.append("</div>")
    return parts


# Grouped accuracy this far below the random split's means the random split memorized.
MEMORIZATION_GAP = 0.10


def _random_epochs(study: dict) -> str:
    """' (random split: N)' when the random split trained a shorter schedule, else ''."""
    shorter = study.get("random", {}).get("max_epochs")
    full = study.get("grouped", {}).get("max_epochs")
    return f" (random split: {shorter})" if shorter and full and shorter < full else ""


def _settings(study: dict) -> str:
    """The run's settings, first thing in the report."""
    config = study.get("train_config", {})
    run = study.get("run", {})
    rows = [
        ["data", f"{study['dataset']}: {study['n_patches']} patches, {study['n_groups']} groups"],
        ["model", f"{config.get('architecture')} ({config.get('weights')} weights)"],
        [
            "epochs (at most) / patience / min delta",
            f"{study.get('grouped', {}).get('max_epochs', config.get('epochs'))}"
            f"{_random_epochs(study)} / {config.get('patience')} / "
            f"{config.get('min_delta', 1e-4)}",
        ],
        ["seed", config.get("seed")],
        ["defectscope", run.get("defectscope", "unknown")],
        ["CPU", run.get("machine", "unknown")],
        ["training device", run.get("training_device", "cpu")],
        ["started", run.get("started", "unknown")],
        ["wall time", f"{study.get('wall_time_s', 'unknown')} s"],
    ]
    if study.get("resumed"):
        # Grouped by where each reused training ran (a plain name: the record did not say).
        where: dict[str, list[str]] = {}
        for r in study["resumed"]:
            unit, origin = (r, "unknown") if isinstance(r, str) else (r["unit"], None)
            if origin is None:
                origin = f"{r.get('device', 'unknown')}, {r.get('machine', 'unknown')}"
            where.setdefault(origin, []).append(unit)
        text = "; ".join(f"{', '.join(units)} (on {origin})" for origin, units in where.items())
        rows.append(["trainings reused from an earlier run (--resume)", text])
    return "<h2>Run settings</h2>" + _table(["setting", "value"], rows)


def _gap_warnings(study: dict) -> list[str]:
    random_accuracy = study["random"]["metrics"]["accuracy"]
    grouped_accuracy = study["grouped"]["metrics"]["accuracy"]
    if random_accuracy - grouped_accuracy <= MEMORIZATION_GAP:
        return []
    return [
        f"grouped-split accuracy {grouped_accuracy:.3f} is far below the random split's "
        f"{random_accuracy:.3f}: on regions it has not seen the model is much worse than the "
        "random split suggests (that split tests on near-copies of training crops)"
    ]


def _map_lines(check: dict, summary: dict | None) -> list[str]:
    """The large frame's scale matching and out-of-distribution lines, from the frame
    check's record (``study.json``) or, for runs that lack them, ``frame_map/map.json``."""
    summary = summary or {}
    record = check.get("scale", summary.get("scale"))
    lines = [describe(record)] if record else []
    ood = check.get("out_of_distribution", summary.get("out_of_distribution"))
    share = check.get("unknown_share", summary.get("unknown_share"))
    if ood and share is not None:
        lines.append(
            f"out of distribution: {share:.0%} of windows unknown; its known regions are "
            "guesses on data unlike the training data and no ROI is proposed from it"
        )
    return lines


def write_report(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write ``report.html`` for a run directory and return its path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"{run}: run directory not found")
    study = _read_json(run / "study.json")
    output = Path(output) if output is not None else run / "report.html"
    title = f"defectscope run: {study['dataset'] if study else run.name}"
    parts = [f"<h1>{html.escape(title)}</h1>"]
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        if study:
            parts.append(_settings(study))
            timings = _read_json(run / "timings.json")
            if timings:
                rows = [[name, round(seconds, 1)] for name, seconds in timings.items()]
                rows.append(["total (before this report)", round(sum(timings.values()), 1)])
                parts.append("<h3>Time per step</h3>" + _table(["step", "seconds"], rows))
            warnings = [
                f"{name} split model: {w}"
                for name in ("random", "grouped")
                for w in study[name].get("warnings", [])
            ]
            warnings += _gap_warnings(study)
            if warnings:
                items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
                parts.append(f'<div class="warning"><strong>Warning</strong><ul>{items}</ul></div>')
            parts += _study_section(run, study, scratch)
            check = study.get("frame_check")
            if check:
                parts.append("<h2>Defect map of the large frame</h2>")
                for line in _map_lines(check, _read_json(run / "frame_map" / "map.json")):
                    css = ' class="warning"' if "warning" in line or "out of" in line else ""
                    parts.append(f"<p{css}>{html.escape(line)}</p>")
                parts.append(_img(run / "frame_map" / "overlay.png", "defect map overlay"))
                if (run / "frame_map" / "uncertainty.png").is_file():
                    unknown = check.get("unknown_share")
                    share = f" {unknown:.1%} of windows are unknown." if unknown is not None else ""
                    parts.append(
                        "<p>Uncertainty: how unlike the training data each window is; "
                        "outlined windows are unknown (beyond the validation threshold)."
                        f"{share}</p>"
                    )
                    parts.append(_img(run / "frame_map" / "uncertainty.png", "uncertainty map"))
                rows = [
                    [c, r["located"], r["recovered"]]
                    for c, r in check["recall_at_crop_sources"].items()
                    if r["located"]
                ]
                parts.append(
                    "<p>Share of each class's crops whose nearest window gets that "
                    "class (the crops are training data: localization, not "
                    "generalization).</p>"
                )
                parts.append(_table(["class", "crops located", "labelled correctly"], rows))
        else:
            parts.append('<p class="missing">study.json not found: no evaluation.</p>')
        export = _read_json(run / "model" / "export.json")
        if export:
            parts.append("<h2>Exported engines</h2>")
            rows = [
                ["ONNX FP32 vs PyTorch", "max |Δp|", export["onnx"]["max_abs_diff_probabilities"]]
            ]
            if "int8" in export:
                q = export["int8"]
                scored_on = q.get("evaluation_patches", "held-out patches")
                rows += [
                    ["ONNX INT8 vs FP32", "agreement", q["agreement"]],
                    [f"FP32 accuracy ({scored_on})", "accuracy", q["accuracy_reference"]],
                    [f"INT8 accuracy ({scored_on})", "accuracy", q["accuracy_candidate"]],
                ]
            parts.append(_table(["comparison", "measure", "value"], rows))
        cluster = _read_json(run / "cluster" / "cluster.json")
        parts.append("<h2>Clustering of embeddings</h2>")
        if cluster:
            learned = cluster["learned"]
            rows = [
                ["learned embedding", learned["k"], learned.get("ari", ""), learned.get("nmi", "")]
            ]
            if "raw_pixels" in cluster:
                raw = cluster["raw_pixels"]
                rows.append(["raw pixels (baseline)", raw["k"], raw["ari"], raw["nmi"]])
            parts.append(_table(["features", "chosen k", "ARI", "NMI"], rows))
            parts.append('<div class="grid">')
            for name in ("silhouette", "pca", "montage"):
                parts.append(f"<div>{_img(run / 'cluster' / f'{name}.png', name)}</div>")
            parts.append("</div>")
        else:
            parts.append('<p class="missing">cluster/cluster.json not found.</p>')
        rois = _read_json(run / "rois.json")
        parts.append("<h2>Regions of interest</h2>")
        if rois is not None:
            rows = []
            for r in rois:
                y0, x0, y1, x1 = r["bbox"]
                size = f"{y1 - y0} x {x1 - x0}"
                if r.get("size_calibrated") and r.get("unit"):
                    height, width = r["size_calibrated"]
                    size += f" ({height:.3g} x {width:.3g} {r['unit']})"
                rows.append(
                    [
                        r["rank"],
                        r["label"] + (" (unknown)" if r.get("unknown") else ""),
                        r["score"],
                        "n/a" if r["defect_probability"] is None else r["defect_probability"],
                        r["novelty"],
                        f"({r['center'][0]:.0f}, {r['center'][1]:.0f})",
                        f"({y0}, {x0}, {y1}, {x1})",
                        size,
                        r.get("n_windows", ""),
                    ]
                )
            parts.append(
                _table(
                    [
                        "rank",
                        "label",
                        "score",
                        "p(defect)",
                        "novelty",
                        "centre (y, x) px",
                        "bbox (y0, x0, y1, x1) px",
                        "size px (calibrated)",
                        "windows",
                    ],
                    rows,
                )
            )
            parts.append(
                "<p>Regions covering more than half of the frame are not ranked as ROIs "
                "(they are the frame, not a place to go).</p>"
            )
        else:
            parts.append('<p class="missing">rois.json not found.</p>')
    body = "\n".join(parts)
    document = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>\n"
    )
    atomic_write_text(output, document)
    return output
