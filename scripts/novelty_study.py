"""Leave-one-class-out AUROC of the lattice residual on the public patches, every fold.

No training: the residual's density needs none. Writes OUT/novelty.json and
OUT/novelty.md (the table in docs/evaluation.md). About a minute on 2 cores.

    python scripts/novelty_study.py --out runs/novelty [--data ../shared/datasets/...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", type=Path, help="public data folder (default: found as the CLI does)")
    p.add_argument("--datasets", nargs="+", default=["cdte", "sto"], choices=["cdte", "sto"])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-physical-copies",
        action="store_true",
        help="fit the density on the patches alone, as before 2026-12-04 (default: with "
        "physically varied copies of the patches from train's default augmentation, as train "
        "fits it)",
    )
    args = p.parse_args(argv)

    from defectscope.evaluation.grouping import find_groups
    from defectscope.evaluation.metrics import grouped_folds
    from defectscope.io.datasets import dataset_folder, load_patches, locate_upstream
    from defectscope.io.files import atomic_write_json, atomic_write_text
    from defectscope.studies.novelty import residual_leave_one_class_out, residual_loco_markdown
    from defectscope.training.config import TrainConfig
    from defectscope.util.system import cpu_description

    try:
        upstream = locate_upstream(args.data, download=False)
        report = {"cpu": cpu_description(), "folds": args.folds, "seed": args.seed}
        lines = [
            "| dataset | left out | folds | AUROC lattice residual (per fold) "
            "| left-out flagged unknown |",
            "|---|---|---|---|---|",
        ]
        for name in args.datasets:
            patches = load_patches(dataset_folder(upstream, name))
            groups = find_groups(patches.images)
            folds = grouped_folds(
                patches.labels, groups.ids, patches.classes, n_folds=args.folds, seed=args.seed
            )
            augmentation = None
            if not args.no_physical_copies:
                augmentation = TrainConfig().training_augmentation
            report[name] = residual_leave_one_class_out(patches, folds, augmentation)
            lines += residual_loco_markdown(name, report[name])
            known = report[name]["known_unknown"]
            print(f"{name}: held-out known patches called unknown {known['mean']:.3f} (mean)")
        lines += [
            "",
            "Residual density fitted "
            + (
                "on the patches alone (--no-physical-copies)."
                if args.no_physical_copies
                else "on the patches and physically varied copies of them (as train)."
            ),
        ]
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out / "novelty.json", report)
        atomic_write_text(args.out / "novelty.md", "\n".join(lines) + "\n")
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    print(json.dumps({k: report[k]["known_unknown"] for k in args.datasets}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
