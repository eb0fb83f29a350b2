"""The trunk's pretraining recipe: every crystal family simulates, the patches pool into
one grouped set, and the exported trunk carries the hashes that make it reproducible."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ase")

from defectscope.simulate.dataset import simulate_frame
from defectscope.simulate.specimen import BUILTIN_STRUCTURES
from defectscope.training.pretrain import Recipe, pool_patches, simulate_recipe

RECIPE = Path(__file__).resolve().parents[2] / "scripts" / "pretrain_trunk.json"


def test_the_recipe_covers_every_builtin_family_and_its_settings_check():
    recipe = Recipe.load(RECIPE)
    combos = recipe.settings()
    assert {s.structure for s in combos.values()} == set(BUILTIN_STRUCTURES)
    assert len({s.seed for s in combos.values()}) == len(combos)  # no two alike
    for settings in combos.values():
        assert settings.exponent_range and settings.column_scatter > 0 and settings.vary > 0
        # Made before simulate's Bulk placement default changed: still its data's.
        assert settings.bulk_near_defects is False


def test_every_family_of_the_recipe_renders_its_defects():
    # One small frame per crystal and zone: every defect kind the recipe asks for is
    # placed and lies inside the frame.
    recipe = Recipe.load(RECIPE)
    seen = set()
    for tag, settings in recipe.settings().items():
        key = tag.rsplit("_p", 1)[0]
        if key in seen:
            continue
        seen.add(key)
        small = dataclasses.replace(settings, size=448, frames=1, defects_per_frame=None)
        frame, record = simulate_frame(small, 0)
        kinds = {d["kind"] for d in record["defects"]}
        wanted = {item.split(":")[0] for item in settings.defects.split(",")}
        assert kinds == wanted, tag
        assert frame.shape == (448, 448) and frame.std() > 0
        assert record["lattice_spacing"] > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"crystals": []}, "at least one"),
        ({"pixel_sizes": [0.02, float("inf")]}, "pixel_sizes"),
        ({"name": "../x"}, "letters, digits"),
        ({"frames": 0}, "frames must be a positive integer"),
        ({"bogus": 1}, "unknown keys \\['bogus'\\]"),
        ({"crystals": [{"structure": "srtio3", "zones": ["0,0,1"], "defects": "hole"}]}, "hole"),
        ({"pixel_sizes": 0.02}, "pixel_sizes must be a JSON list"),
        ({"crystals": 3}, "crystals must be a JSON list"),
        ({"simulation": {"thicknes": 4}}, "thicknes"),
        ({"architecture": "resnet"}, "architecture 'resnet'"),
        ({"train": {"epoch": 8}}, "epoch"),
        ({"train": {"batch_size": -3}}, "batch_size -3"),
        ({"name": "none"}, "--weights keyword"),
    ],
)
def test_a_bad_recipe_is_named(tmp_path, change, message):
    data = {**json.loads(RECIPE.read_text()), **change}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        Recipe.load(path).settings()


def tiny_recipe(tmp_path: Path) -> Recipe:
    data = json.loads(RECIPE.read_text())
    data.update(
        frames=2,
        size=256,
        pixel_sizes=[0.02],
        crystals=[
            {"structure": "srtio3", "zones": ["0,0,1"], "defects": "vacancy:Sr,interstitial"},
            {"structure": "au", "zones": ["0,0,1"], "defects": "vacancy"},
        ],
        train={"epochs": 1, "precision": "fp32", "batch_size": 16},
    )
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(data))
    return Recipe.load(path)


def test_pooled_patches_keep_crystals_and_frames_apart(tmp_path):
    recipe = tiny_recipe(tmp_path)
    folders = simulate_recipe(recipe, tmp_path / "sim", progress=False)
    patches = pool_patches(folders)
    assert patches.classes == [
        "au:Bulk",
        "au:Vacancy_Au",
        "srtio3:Bulk",
        "srtio3:Interstitial_Sr",
        "srtio3:Vacancy_Sr",
    ]
    # Each frame its own group: 2 crystals x 2 frames, no group shared by two crystals.
    assert len(np.unique(patches.groups)) == 4
    crystal = np.array([patches.classes[i].split(":")[0] for i in patches.labels])
    for group in np.unique(patches.groups):
        assert len(set(crystal[patches.groups == group])) == 1
    # A second run reuses what is there; another recipe in the same place is refused.
    assert simulate_recipe(recipe, tmp_path / "sim", progress=False) == folders
    other = dataclasses.replace(recipe, seed=5)
    with pytest.raises(ValueError, match="holds another simulation"):
        simulate_recipe(other, tmp_path / "sim", progress=False)
    # Same settings text, but made when it meant other classes (bare 'vacancy' once
    # took light elements too): refused, not pooled with today's classes.
    truth = folders[0] / "truth.json"
    record = json.loads(truth.read_text())
    assert record["defect_classes"]
    record["defect_classes"] = [*record["defect_classes"], "Vacancy_O"]
    truth.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="holds another simulation"):
        simulate_recipe(recipe, tmp_path / "sim", progress=False)


def test_pretraining_writes_a_trunk_its_manifest_describes(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from defectscope.io.files import file_hash
    from defectscope.nets import shipped
    from defectscope.nets.vgg import build_model
    from defectscope.training.pretrain import patch_digest, pretrain_trunk

    torch.set_num_threads(1)
    recipe = tiny_recipe(tmp_path)
    manifest = pretrain_trunk(recipe, tmp_path / "run", progress=False)
    trunk = tmp_path / "run" / "trunk"
    assert manifest["sha256"] == file_hash(trunk / "sim-haadf.pt")
    assert manifest["recipe_sha256"] == recipe.digest()
    folders = [tmp_path / "run" / "sim" / tag for tag in recipe.settings()]
    assert manifest["data_sha256"] == patch_digest(pool_patches(folders))
    assert manifest["recipe"] == recipe.to_dict() and manifest["license"] == "MIT"
    # The trunk is the trained model's, loadable by name from where it was installed.
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", trunk)
    model = build_model(2, weights="sim-haadf", architecture="vgg16_bn")
    trained = torch.load(tmp_path / "run" / "model" / "weights.pt", weights_only=True)
    got = model.features.state_dict()["0.weight"]
    np.testing.assert_allclose(
        got.numpy(), trained["features.0.weight"].numpy(), rtol=1e-3, atol=1e-5
    )
