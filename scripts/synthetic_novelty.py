"""Synthetic novelty check with a trained network (issue 27): is a left-out defect new?

A model is trained as ``train --simulated`` trains (``train_from_simulated``: the
shipped trunk, early stop, densities with physical copies, the residual in the window
centres) on the synthetic domain-shift study's nominal SrTiO3 [001] frames without one
defect kind's patches (default the Ti->Nb substitution), then scored on patches cut
around every defect of new frames (and their ``Bulk`` patches): AUROC "left-out kind is
new" and the share called unknown, per score. Writes OUT/synthetic_novelty.json and .md.
About 10 minutes on 2 cores (simulation, a 10-epoch training, scoring).

    python scripts/synthetic_novelty.py --out runs/synthetic-novelty [--train DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--train",
        type=Path,
        help="the study's training set (a scale_study OUT/train); made in OUT/train if absent",
    )
    p.add_argument("--left-out", default="Substitution_Ti_Nb", help="the defect kind left out")
    p.add_argument("--seed", type=int, default=0, help="training frames' and training's seed")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--frames", type=int, default=6, help="test frames of 768²")
    p.add_argument("--per-defect", type=int, default=4, help="test patches cut around each defect")
    args = p.parse_args(argv)

    from sklearn.metrics import roc_auc_score

    from defectscope.engines.loader import load_engine
    from defectscope.io.datasets import load_patches
    from defectscope.io.files import atomic_write_json, atomic_write_text
    from defectscope.maps.detector import score_novelty
    from defectscope.simulate.dataset import cut_patches, simulate_frame
    from defectscope.studies.domain_shift import simulate_training_set, study_settings
    from defectscope.tiling.tiler import patches_to_inputs
    from defectscope.training.config import TrainConfig
    from defectscope.training.loop import train_from_simulated
    from defectscope.util.system import cpu_description

    settings = study_settings(frames=32, size=512, seed=args.seed)
    train_dir = simulate_training_set(settings, args.train or args.out / "train", progress=True)
    patches = load_patches(train_dir / "patches")
    if args.left_out not in patches.classes:
        print(f"error: {args.left_out!r} is not one of {patches.classes}", file=sys.stderr)
        return 2
    # The other kinds, renumbered, keeping their frames as groups (grouped validation).
    known = patches.without_class(args.left_out)
    model_dir = args.out / "model"
    config = TrainConfig(epochs=args.epochs, seed=args.seed)
    result = train_from_simulated(known, model_dir, config, "grouped")

    # New frames (another seed than the training frames and the shift study's tests).
    test_settings = dataclasses.replace(settings, size=768, seed=2000 + args.seed)
    rng = np.random.default_rng(args.seed)
    pairs = []
    size = patches.patch_size
    for k in range(args.frames):
        frame, record = simulate_frame(test_settings, k)
        pairs += cut_patches(frame, record["defects"], size, args.per_defect, rng, True)
    kinds = np.array([kind for kind, _ in pairs])
    windows = np.stack([patch for _, patch in pairs]).astype(np.float32)
    engine = load_engine(model_dir, backend="torch")
    probabilities, embeddings = engine.run(patches_to_inputs(windows, engine.config.normalization))
    is_new = kinds == args.left_out
    scores = {}
    for name, density, residual in (
        ("embedding density", engine.density, None),
        ("lattice residual", None, engine.residual_density),
        ("combined (--novelty auto)", engine.density, engine.residual_density),
        ("MC dropout (--novelty mc_dropout)", engine.mc_dropout, None),
        ("head ensemble (--novelty ensemble)", engine.head_ensemble, None),
        ("MC dropout + lattice residual", engine.mc_dropout, engine.residual_density),
        ("head ensemble + lattice residual", engine.head_ensemble, engine.residual_density),
    ):
        uncertainty, unknown = score_novelty(density, residual, embeddings, windows)
        scores[name] = {
            "auroc": float(roc_auc_score(is_new, uncertainty)),
            "new_unknown": float(unknown[is_new].mean()),
            "known_unknown": float(unknown[~is_new].mean()),
        }
    softmax = 1.0 - probabilities.max(axis=1)
    scores["softmax (1 - top probability)"] = {"auroc": float(roc_auc_score(is_new, softmax))}
    per_kind = {str(kind): int((kinds == kind).sum()) for kind in sorted(set(kinds))}
    report = {
        "cpu": cpu_description(),
        "left_out": args.left_out,
        "seed": args.seed,
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "training_set": str(train_dir),
        "test_windows": per_kind,
        "scores": scores,
    }
    lines = [
        f"Left out: {args.left_out}; test windows {per_kind}; training {len(result.history)} "
        f"epochs (kept epoch {result.best_epoch + 1}); {report['cpu']}.",
        "",
        "| score | AUROC left-out kind is new | left-out kind unknown | trained kinds unknown |",
        "|---|---|---|---|",
    ]
    for name, s in scores.items():
        new = f"{100 * s['new_unknown']:.1f} %" if "new_unknown" in s else "–"
        old = f"{100 * s['known_unknown']:.1f} %" if "known_unknown" in s else "–"
        lines.append(f"| {name} | {s['auroc']:.3f} | {new} | {old} |")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "synthetic_novelty.json", report)
    atomic_write_text(args.out / "synthetic_novelty.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
