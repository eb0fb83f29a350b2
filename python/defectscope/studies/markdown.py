"""Markdown."""

from __future__ import annotations

from pathlib import Path

from defectscope.evaluation.metrics import LOCO_SCORES
from defectscope.evaluation.metrics import format_mean_std as fmt


def summary_markdown(report: dict) -> str:
    """Side-by-side table of the random and grouped protocols."""
    rnd, grp = report["random"], report["grouped"]
    lines = [
        f"# defectscope study: {report['dataset']}",
        "",
        f"{report['n_patches']} patches, {report['n_groups']} independent groups "
        f"(overlap threshold {report['overlap_threshold']}).",
        "",
        "| class | patches | groups | evaluable | random F1 | grouped F1 |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["classes"]:
        evaluable = c in grp["split"]["evaluable_classes"]
        g_f1 = f"{grp['metrics']['per_class'][c]['f1']:.3f}" if evaluable else "not evaluable"
        lines.append(
            f"| {c} | {report['counts'][c]} | {report['groups_per_class'][c]} | "
            f"{'yes' if evaluable else 'no'} | "
            f"{rnd['metrics']['per_class'][c]['f1']:.3f} | {g_f1} |"
        )
    lines += [
        "",
        "| protocol | test patches | accuracy | macro-F1 (scored classes) "
        "| ECE before | ECE after T |",
        "|---|---|---|---|---|---|",
    ]
    for name, part in (("random split", rnd), ("grouped split", grp)):
        m, cal = part["metrics"], part["calibration"]
        lines.append(
            f"| {name} | {part['split']['n_test']} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} "
            f"({len(m['macro_f1_classes'])}) | {cal['ece_before']:.3f} | {cal['ece_after']:.3f} |"
        )
    lines += symmetry_markdown(report)
    lines += cross_validation_markdown(report)
    lines += loco_markdown(report)
    for name, part in (("random", rnd), ("grouped", grp)):
        for warning in part.get("warnings", []):
            lines += ["", f"**Warning ({name} split model):** {warning}"]
    if "frame_check" in report:
        check = report["frame_check"]
        lines += [
            "",
            f"Map of {Path(check['frame']).name} (stride {check['stride']}): share of each "
            "class's crops whose nearest window gets that class (training crops: a "
            "localization check, not generalization).",
            "",
            "| class | crops located in frame | labelled correctly |",
            "|---|---|---|",
        ]
        for c, r in check["recall_at_crop_sources"].items():
            if r["located"]:
                lines.append(f"| {c} | {r['located']} | {r['recovered']:.3f} |")
    lines += [
        "",
        "The random split tests on near-copies of training crops and measures memorization;",
        "the grouped split tests on regions never seen in training. Classes present in fewer",
        "than three independent groups are trained on but not scored.",
    ]
    shorter, full = rnd.get("max_epochs"), grp.get("max_epochs")
    if shorter and full and shorter < full:
        lines.append(
            f"The random split trains for {shorter} of the schedule's {full} epochs at most: "
            "near-copies are fitted early."
        )
    lines.append("")
    return "\n".join(lines)


def symmetry_markdown(report: dict) -> list[str]:
    """Test-time D4 averaging on the grouped test split, as Markdown lines."""
    sym = report["grouped"].get("test_time_symmetry")
    if not sym:
        return []
    return [
        "",
        f"Test-time symmetry on the grouped test split ({sym['n_test']} patches): accuracy "
        f"{sym['accuracy_none']:.3f} -> {sym['accuracy_d4']:.3f} with D4 averaging, ECE "
        f"{sym['ece_none']:.3f} -> {sym['ece_d4']:.3f}, at "
        f"{sym['seconds_d4'] / max(sym['seconds_none'], 1e-9):.1f}x the inference time.",
    ]


def cross_validation_markdown(report: dict) -> list[str]:
    """The grouped k-fold table, next to the random split, as Markdown lines."""
    cv = report.get("cross_validation")
    if not cv:
        return []
    rnd = report["random"]["metrics"]
    lines = [
        "",
        f"Grouped {cv['n_folds']}-fold cross-validation ({cv['n_test']} test patches, each "
        "independent group tested once; mean ± standard deviation over folds):",
        "",
        "| class | folds tested | test patches | grouped F1 | grouped recall | random-split F1 |",
        "|---|---|---|---|---|---|",
    ]
    for c, m in cv["per_class"].items():
        lines.append(
            f"| {c} | {m['f1']['n']} | {m['support']} | {fmt(m['f1'])} | {fmt(m['recall'])} "
            f"| {rnd['per_class'][c]['f1']:.3f} |"
        )
    lines += [
        "",
        "| protocol | accuracy | macro-F1 | ECE before | ECE after T |",
        "|---|---|---|---|---|",
        f"| grouped {cv['n_folds']}-fold | {fmt(cv['accuracy'])} | {fmt(cv['macro_f1'])} | "
        f"{fmt(cv['ece_before'])} | {fmt(cv['ece_after'])} |",
    ]
    unknown = cv.get("held_out_unknown")
    if unknown:
        per_fold = [f.get("held_out_unknown") for f in cv["folds"]]
        shares = " ".join("–" if not u else f"{u['combined']:.3f}" for u in per_fold)
        counted = unknown["combined"]["n"]
        over = "" if counted == cv["n_folds"] else f" over {counted} of {cv['n_folds']} folds"
        lines += [
            "",
            "Held-out test patches of trained classes called unknown (false alarms of "
            f'"new"){over}: {fmt(unknown["combined"])} by either density '
            f"(`--novelty embedding+residual`; embedding {fmt(unknown['embedding'])}, "
            f"lattice residual {fmt(unknown['residual'])}; per fold {shares}).",
        ]
        for key, name in (
            ("mc_dropout", "MC dropout"),
            ("ensemble", "head ensemble"),
            ("mc_dropout_residual", "MC dropout + residual"),
            ("ensemble_residual", "head ensemble + residual"),
        ):
            if key in unknown:
                lines[-1] = lines[-1][:-2] + (
                    f"; {name} {fmt(unknown[key])} over {unknown[key]['n']} folds)."
                )
    return lines


def loco_markdown(report: dict) -> list[str]:
    """The leave-one-class-out table as Markdown lines."""
    loco = report.get("leave_one_class_out")
    if not loco:
        return []
    columns = [(f"AUROC {name}", f"auroc_{key}") for name, key in LOCO_SCORES]
    flagged = "combined; MC dropout; head ensemble; MC dropout + residual; head ensemble + residual"
    lines = [
        "",
        'Leave one class out: trained without the class, AUROC of "the class is unknown" '
        "against held-out (grouped test) patches of the trained classes:",
        "",
        "| left out | its patches | held-out known | "
        + " | ".join(header for header, _ in columns)
        + f" | left-out flagged unknown ({flagged}) | known flagged unknown ({flagged}) |",
        "|---|---|---|" + "---|" * (len(columns) + 2),
    ]

    def number(r: dict, key: str) -> str:
        # Records resumed from earlier releases lack the newer scores.
        return f"{r[key]:.3f}" if isinstance(r.get(key), int | float) else "–"

    for c, r in loco.items():
        if "skipped" in r:
            lines.append(f"| {c} | skipped: {r['skipped']} |" + " |" * (len(columns) + 3))
            continue
        cells = [str(r["n_novel"]), str(r["n_known"])]
        cells += [number(r, key) for _, key in columns]
        cells += [
            f"{r[f'{part}_unknown']:.3f} ({number(r, f'{part}_unknown_combined')}; "
            f"{number(r, f'{part}_unknown_mc_dropout')}; "
            f"{number(r, f'{part}_unknown_ensemble')}; "
            f"{number(r, f'{part}_unknown_mc_dropout_residual')}; "
            f"{number(r, f'{part}_unknown_ensemble_residual')})"
            for part in ("novel", "known")
        ]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines
