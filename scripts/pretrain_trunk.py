"""Pretrain the shipped VGG-16-BN trunk on simulated HAADF crystals (issue 28).

Usage: python scripts/pretrain_trunk.py [RECIPE.json] [OUT] [--install]

RECIPE defaults to scripts/pretrain_trunk.json, OUT to runs/pretrain. Writes
OUT/sim/<crystal_zone_pixel>/ (simulated frames and patches), OUT/model/ (the classifier)
and OUT/trunk/<name>.pt + <name>.json (fp16 trunk and manifest: SHA-256, recipe, data
hash, seed, time, CPU). ``--install`` copies the trunk and manifest into the package
(python/defectscope/nets/weights/), where ``--weights <name>`` finds them. Threads:
OMP_NUM_THREADS / torch's default; ``--device``/precision come from the recipe's "train".
"""

import json
import shutil
import sys
from pathlib import Path

from defectscope.training.pretrain import Recipe, pretrain_trunk

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> None:
    install = "--install" in argv
    args = [a for a in argv if a != "--install"]
    if any(a.startswith("-") for a in args) or len(args) > 2:
        sys.exit(__doc__)
    recipe_path = Path(args[0]) if args else ROOT / "scripts" / "pretrain_trunk.json"
    out = Path(args[1]) if len(args) > 1 else ROOT / "runs" / "pretrain"
    recipe = Recipe.load(recipe_path)
    manifest = pretrain_trunk(recipe, out)
    print(json.dumps({k: manifest[k] for k in ("name", "sha256", "epochs", "seconds")}))
    if install:
        target = ROOT / "python" / "defectscope" / "nets" / "weights"
        target.mkdir(exist_ok=True)
        for suffix in (".pt", ".json"):
            shutil.copyfile(
                out / "trunk" / f"{recipe.name}{suffix}", target / f"{recipe.name}{suffix}"
            )
        print(f"installed into {target}")


if __name__ == "__main__":
    main(sys.argv[1:])
