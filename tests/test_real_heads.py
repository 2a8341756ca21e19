"""The real heads of issue 20 (aerial land use, aerial buildings, Sentinel-2 ships): their training
configs split by place, their model directories load as ``geoseg run`` loads them, each runs on a
small held-out real crop at its own pixel size (buildings and ships scored there against their
labels), and the model cards in docs/models.md quote the held-out
scores that ``geoseg train --evaluate`` wrote into each ``geoseg.json``.

Fast: no training and no full-scene scoring here (``geoseg train CONFIG --evaluate`` re-scores a
model in about a minute; the figures are compared with what it recorded).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from affine import Affine
from rasterio.enums import Resampling
from rasterio.windows import Window

from geoseg.core.config import load_config
from geoseg.models.load import check_models
from geoseg.train.config import load_train_config

REPO = Path(__file__).resolve().parents[1]

# training config, model directory, head name in the run configs
HEADS = {
    "landuse": ("aerial-landuse.yaml", "aerial-landuse"),
    "buildings": ("aerial-buildings.yaml", "aerial-buildings"),
    "ships": ("s2-ships-l2a.yaml", "s2-ships-l2a"),
}


def _contract(model: str) -> dict:
    return json.loads((REPO / "models" / model / "geoseg.json").read_text())


@pytest.mark.parametrize("head", list(HEADS))
def test_training_config_splits_by_place_and_names_its_model(shared_data, head):
    config, model = HEADS[head]
    cfg = load_train_config(REPO / "configs" / "train" / config)
    assert Path(cfg.base_dir, cfg.out).resolve() == (REPO / "models" / model).resolve()
    # Whole places: no scene is split by rows, and no place is both trained on and held out.
    assert all(s.split in ("train", "holdout") for s in cfg.scenes)
    train = {s.place for s in cfg.scenes if s.split == "train"}
    held = {s.place for s in cfg.scenes if s.split == "holdout"}
    assert train and held and not train & held and None not in train | held
    contract = _contract(model)
    assert contract["trained_on"]["imagery"] == "real"
    assert set(contract["metrics"]["places"]) == held
    assert contract["data"] and contract["licence"]
    assert (REPO / "models" / model / "model.safetensors").stat().st_size < 20e6


def test_contracts_say_what_the_heads_take():
    landuse, buildings, ships = (_contract(m) for _, m in HEADS.values())
    assert landuse["task"] == "semantic" and landuse["classes"] == ["building", "land", "road", "vegetation", "water"]
    assert landuse["input"]["dtype"] == "uint8" and landuse["input"]["count"] == 3 and landuse["input"]["gsd_m"] > 0
    assert buildings["task"] == "instance" and buildings["channels"] == ["body", "border", "contact"]
    assert buildings["input"]["dtype"] == "uint8" and buildings["input"]["count"] == 3
    assert "OpenStreetMap" in buildings["licence"] and "ODbL" in buildings["licence"]
    assert ships["task"] == "instance" and ships["input"]["names"] == ["B02", "B03", "B04", "B08"]
    assert ships["input"]["dtype"] == "uint16" and ships["input"]["gsd_m"] == 10
    assert ships["metrics"]["objects"]["iou_threshold"] == 0.3
    assert buildings["metrics"]["objects"]["iou_threshold"] == 0.5


def test_aerial_config_loads_both_heads():
    cfg = load_config(REPO / "configs" / "aerial.yaml")
    assert set(cfg.models) == {"landuse", "buildings"}
    check_models(cfg)  # builds each network and runs it once: weights, bands and outputs fit


def _write(path: Path, data: np.ndarray, crs: str, transform: Affine) -> Path:
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype,
        crs=crs,
        transform=transform,
    ) as ds:
        ds.write(data)
    return path


def _crop_at(src: Path, col: int, row: int, size: int, gsd: float, out: Path) -> Path:
    """A ``size`` x ``size`` crop of a georeferenced raster at ``gsd`` m (averaged), from (col, row)."""
    with rasterio.open(src) as ds:
        from geoseg.core.contract import scene_gsd_m

        factor = gsd / scene_gsd_m(ds.crs.to_wkt(), ds.transform, ds.width, ds.height)
        n = int(round(size * factor))
        data = ds.read(window=Window(col, row, n, n), out_shape=(ds.count, size, size), resampling=Resampling.average)
        tr = ds.window_transform(Window(col, row, n, n)) @ Affine.scale(n / size)
        return _write(out, data, ds.crs.to_wkt(), tr)


SHIPS_CROP = Window(640, 416, 256, 256)  # Durban's quays: 20 vessels


def _crops(shared: Path, tmp: Path) -> dict[str, Path]:
    # Land use: a held-out Dubai image (tile 2, never trained on) at the model's pixel size, given a
    # georeference in UTM 40N (the images have none): 1.2 m estimated, read at 2.4 m.
    from PIL import Image

    gsd = _contract("aerial-landuse")["input"]["gsd_m"]
    with Image.open(shared / "dubai_landcover/tile_2/images/image_part_001.jpg") as im:
        step = gsd / 1.2
        rgb = np.asarray(im.convert("RGB").resize((int(im.width / step), int(im.height / step)), Image.BOX))
    landuse = _write(
        tmp / "dubai.tif",
        np.ascontiguousarray(rgb[:192, :192].transpose(2, 0, 1)),
        "EPSG:32640",
        Affine(gsd, 0, 300000, 0, -gsd, 2780000),
    )
    # Buildings: held-out Nairobi at 0.3 m, a crop with imagery and buildings.
    buildings = _crop_at(shared / "hotosm_buildings/nairobi.tif", 1024, 6400, 256, 0.3, tmp / "nairobi.tif")
    # Ships: held-out Durban, the four L2A band files stacked in order, a crop of its quays with 20
    # vessels in the COCO labels.
    bands = []
    for b in ("B02", "B03", "B04", "B08"):
        (f,) = (shared / "sen2ships/durban").glob(f"*_{b}__Raw_.tiff")
        with rasterio.open(f) as ds:
            bands.append(ds.read(1, window=SHIPS_CROP))
            crs, tr = ds.crs.to_wkt(), ds.window_transform(SHIPS_CROP)
    ships = _write(tmp / "durban.tif", np.stack(bands), crs, tr)
    return {"landuse": landuse, "buildings": buildings, "ships": ships}


def test_each_head_runs_on_a_small_real_crop(ray_session, shared_data, tmp_path):
    from geoseg.runner.pipeline import run

    crops = _crops(shared_data, tmp_path)
    for head, (_, model) in HEADS.items():
        cfg = tmp_path / f"{head}.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {"tiling": {"tile_size": 256, "halo": 32}, "models": {head: {"weights": str(REPO / "models" / model)}}}
            )
        )
        scene = crops[head]
        report = run([str(scene)], tmp_path / "out", load_config(cfg), progress=False)
        assert report.ok, report.failures
        assert not report.warnings, report.warnings  # real imagery, real models: no synthetic warning
        out = tmp_path / "out" / scene.stem
        with rasterio.open(out / f"{scene.stem}_{head}.tif") as ds:
            result = ds.read(1)
        summary = json.loads((out / "summary.json").read_text())["models"][head]
        if head == "landuse":
            classes = {int(v) for v in np.unique(result)} - {255}
            assert classes <= set(range(5)) and len(classes) >= 2
        elif head == "buildings":  # against the OpenStreetMap outlines (held out: Nairobi F1 0.295 recorded)
            import geopandas as gpd

            from geoseg.train.evaluate import distinct_outlines, match_polygons

            with rasterio.open(scene) as ds:
                crs, bounds = ds.crs, ds.bounds
            outlines = gpd.read_file(shared_data / "hotosm_buildings/nairobi_buildings.geojson").to_crs(crs)
            truth = distinct_outlines(list(outlines.clip(bounds).geometry))
            found = list(gpd.read_file(out / f"{scene.stem}.gpkg", layer=head).geometry)
            assert len(found) == summary["classes"]["building"]["count"] >= 1
            # This crop: 12 found, 27 outlines; 2 matched at IoU 0.5, 6 overlap an outline at IoU 0.1.
            assert match_polygons(found, truth, 0.5)["matched"] >= 1
            assert match_polygons(found, truth, 0.1)["matched"] >= 4
        else:  # the vessels found, against the port's COCO masks (held out: Durban F1 0.76 recorded)
            from geoseg.train.data import _coco_ids
            from geoseg.train.evaluate import match_instances

            (b02,) = (shared_data / "sen2ships/durban").glob("*_B02__Raw_.tiff")
            with rasterio.open(b02) as ds:
                shape = ds.shape
            truth = _coco_ids(shared_data / "sen2ships/durban/durban_coco.json", shape)[SHIPS_CROP.toslices()]
            scores = match_instances(result, truth, 0.3)
            assert scores["truth"] == 20 and summary["classes"]["ship"]["count"] == scores["predicted"]
            assert scores["matched"] >= 10 and scores["precision"] >= 0.5, scores


def _card(model: str) -> str:
    """The model's section of docs/models.md (from its '### `model`' heading to the next heading)."""
    text = (REPO / "docs" / "models.md").read_text()
    m = re.search(rf"^### `{re.escape(model)}`.*?(?=^##)", text, re.S | re.M)
    assert m, f"docs/models.md has no section '### `{model}`'"
    return m.group(0)


def _figures(m: dict) -> list[str]:
    if "iou" in m:
        return [f"mean IoU {m['mean_iou']:.3f}"] + [f"{c} {v:.3f}" for c, v in m["iou"].items() if v is not None]
    o = m["objects"]
    return [
        f"{o['predicted']} predicted / {o['truth']} true",
        f"precision {o['precision']:.3f}",
        f"recall {o['recall']:.3f}",
        f"F1 {o['f1']:.3f}",
    ]


@pytest.mark.parametrize("head", list(HEADS))
def test_model_card_quotes_the_recorded_held_out_scores(head):
    _, model = HEADS[head]
    contract = _contract(model)
    card = _card(model)
    metrics = contract["metrics"]
    for fig in _figures(metrics):
        assert fig in card, f"{model}: card lacks '{fig}' (geoseg.json metrics)"
    for place, pm in metrics["places"].items():
        line = next((ln for ln in card.splitlines() if f"| {place} |" in ln), None)
        assert line is not None, f"{model}: card has no row for held-out place {place}"
        for fig in _figures(pm):
            assert fig in line, f"{model}, {place}: card row lacks '{fig}'"
    assert f"{contract['input']['gsd_m']:g} m" in card
    assert f"{contract['training']['seconds'] / 60:.0f} min" in card


def test_colour_coded_masks_globs_and_resampling(tmp_path):
    """What the Dubai config uses: a glob of images without a georeference, ``{stem}`` masks with
    colour-coded classes, a pixel size given by hand, resampled on reading."""
    from PIL import Image

    from geoseg.train.data import load_scene

    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    for k in range(2):
        Image.fromarray(np.full((40, 60, 3), 50 * (k + 1), np.uint8)).save(tmp_path / "img" / f"p{k}.png")
        mask = np.zeros((40, 60, 3), np.uint8)
        mask[:, :30] = (0x3C, 0x10, 0x98)  # building
        mask[:, 30:] = (0xE2, 0xA9, 0x29)  # water
        mask[:4] = (0x9B, 0x9B, 0x9B)  # unlabelled: ignored
        Image.fromarray(mask).save(tmp_path / "msk" / f"p{k}.png")
    cfg_path = tmp_path / "t.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "out": "m",
                "task": "semantic",
                "classes": ["building", "water"],
                "bands": [1, 2, 3],
                "resample_m": 2.0,
                "scenes": [
                    {
                        "image": "img/p0*.png",
                        "labels": "msk/{stem}.png",
                        "pixel_size_m": 1.0,
                        "place": "a",
                        "label_colors": {"#3C1098": "building", "#E2A929": "water"},
                    },
                    {
                        "image": "img/p1*.png",
                        "labels": "msk/{stem}.png",
                        "pixel_size_m": 1.0,
                        "place": "b",
                        "label_colors": {"#3C1098": "building", "#E2A929": "water"},
                        "split": "holdout",
                    },
                ],
            }
        )
    )
    cfg = load_train_config(cfg_path)
    assert [Path(s.image).name for s in cfg.scenes] == ["p0.png", "p1.png"]
    scene = load_scene(cfg, cfg.scenes[1], tmp_path, 1)
    assert scene.image.shape == (3, 20, 30) and scene.place == "b" and int(scene.image.mean()) == 100
    assert (scene.target[2:, :15] == 0).all() and (scene.target[2:, 15:] == 1).all()
    assert (scene.target[:2] == 255).all()  # unlabelled rows (4 px at 1 m) are ignored
