"""STAC: an Item per scene and a Collection per output folder, read back with pystac, with class
names and colours, the grid, a footprint that covers the raster, and relative links only (the
output folder still resolves after it was copied elsewhere)."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import shapely.geometry
from affine import Affine
from jsonschema import Draft7Validator
from pystac.extensions.classification import ClassificationExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import RasterExtension
from pystac.validation.local_validator import get_local_schema_cache
from rasterio.warp import transform_bounds
from referencing import Registry, Resource

from geoseg.core.config import load_config
from geoseg.outputs.stac import COLLECTION_FILE, collection_id, item_id, scene_item
from geoseg.outputs.styles import class_colors
from geoseg.raster.read import inspect_scene
from geoseg.runner.pipeline import run
from geoseg.train.synth import write_scene

SCENES = {"top": "top.tif", "sub/deep": "sub/deep.tif"}  # output folder -> input below in/
KNOWN = (".tif", ".gpkg", ".parquet", ".png", ".qml", ".json")  # file kinds the Item lists


@pytest.fixture(scope="module")
def config(oracle_config_path):
    return load_config(oracle_config_path, {"tiling": {"tile_size": 256, "halo": 16}, "runtime": {"batch_size": 4}})


@pytest.fixture(scope="module")
def published(ray_session, tmp_path_factory, config):
    root = tmp_path_factory.mktemp("stac")
    (root / "in" / "sub").mkdir(parents=True)
    write_scene(root / "in" / "top.tif", size=256, seed=31)
    write_scene(root / "in" / "sub" / "deep.tif", size=256, seed=32, crs="EPSG:3857")  # another CRS, nested
    report = run([str(root / "in")], root / "out", config, progress=False, recursive=True)
    assert report.ok and report.processed == 2, report.failures
    return root


def _core_validator(kind: str) -> Draft7Validator:
    """The STAC 1.1.0 core schema of ``kind`` (item or collection) from pystac's own copies: no network."""
    cache = get_local_schema_cache()
    registry = Registry().with_resources([(uri, Resource.from_contents(s)) for uri, s in cache.items()])
    uri = f"https://schemas.stacspec.org/v1.1.0/{kind}-spec/json-schema/{kind}.json"
    return Draft7Validator(cache[uri], registry=registry)


def _check_outputs(out: Path, config, folders: set[str]) -> None:
    """Everything the STAC files say about ``out``, read back with pystac from ``out`` itself."""
    collection = pystac.Collection.from_file(str(out / COLLECTION_FILE))
    assert collection.id == out.name
    items = {item.id: item for item in collection.get_items(recursive=True)}
    assert set(items) == {item_id(f) for f in folders}
    assert _core_validator("collection").is_valid(json.loads((out / COLLECTION_FILE).read_text()))
    bboxes = []
    for folder in folders:
        item = items[item_id(folder)]
        stem = folder.rsplit("/", 1)[-1]
        path = out / folder / f"{stem}.stac.json"
        raw = json.loads(path.read_text())
        errors = [e.message for e in _core_validator("item").iter_errors(raw)]
        assert not errors, errors
        assert not any(link["rel"] == "self" for link in raw["links"])
        assert raw["collection"] == collection.id
        up = "/".join([".."] * (folder.count("/") + 1))
        assert {(link["rel"], link["href"]) for link in raw["links"]} == {
            (rel, f"{up}/{COLLECTION_FILE}") for rel in ("collection", "parent", "root")
        }
        # Every asset is a file of the folder, by a relative href; every file of a known kind is an asset.
        hrefs = {a.href for a in item.assets.values()}
        assert all(h.startswith("./") and "/" not in h[2:] for h in raw_hrefs(raw))
        files = {p.name for p in (out / folder).iterdir() if p.is_file() and p.name.endswith(KNOWN)}
        assert {Path(a.get_absolute_href()).resolve() for a in item.assets.values()} == {
            (out / folder / n).resolve() for n in files - {"manifest.json", path.name}
        }, hrefs
        assert {"landuse", "buildings", "ships", "polygons", "summary"} <= set(item.assets)
        assert item.assets["polygons"].media_type == "application/geopackage+sqlite3"
        # Masks: COG, class values, names and colours (semantic), nodata and data type.
        for model, spec in config.models.items():
            asset = item.assets[model]
            assert asset.media_type == pystac.MediaType.COG and asset.roles == ["data"]
            [band] = RasterExtension.ext(asset).bands
            with rasterio.open(asset.get_absolute_href()) as ds:
                assert (band.nodata, band.data_type) == (ds.nodata, ds.dtypes[0])
                grid = (ds.height, ds.width), list(ds.transform)[:6], ds.crs, ds.bounds
            if spec.task == "semantic":
                classes = ClassificationExtension.ext(asset).classes
                got = [(c.value, c.name, c.color_hint) for c in classes if not c.nodata]
                want = [
                    (i, name, color.lstrip("#").upper())
                    for i, (name, color) in enumerate(zip(spec.classes, class_colors(spec)))
                ]
                assert got == want
                assert [(c.value, c.nodata) for c in classes if c.nodata] == [(255, True)]
            else:
                assert "classification:classes" not in asset.extra_fields
                assert "instance id" in asset.description
        # The grid, as the masks have it; the footprint in EPSG:4326 covers the raster.
        shape, transform, crs, bounds = grid
        proj = ProjectionExtension.ext(item)
        assert proj.shape == list(shape) and proj.transform == transform and proj.bbox == list(bounds)
        assert proj.code == crs.to_string() and proj.code.startswith("EPSG:")
        west, south, east, north = transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=101)
        eps = 1e-9
        assert item.bbox[0] <= west + eps and item.bbox[1] <= south + eps
        assert item.bbox[2] >= east - eps and item.bbox[3] >= north - eps
        assert item.bbox[2] - item.bbox[0] < 1.01 * (east - west)  # and not much more
        footprint = shapely.geometry.shape(item.geometry)
        assert footprint.is_valid and np.allclose(footprint.bounds, item.bbox)
        assert footprint.exterior.is_ccw  # RFC 7946
        assert item.datetime is not None and item.common_metadata.created is not None
        assert item.properties["geoseg:datetime"] == "processing"  # the synthetic scenes carry no acquisition time
        bboxes.append(item.bbox)
    assert len({frozenset(item.assets) for item in items.values()}) == 1  # asset keys do not depend on the scene
    # The Collection: extent of all its Items; class names and colours in its item_assets.
    [extent] = collection.extent.spatial.bboxes
    assert extent == [
        min(b[0] for b in bboxes),
        min(b[1] for b in bboxes),
        max(b[2] for b in bboxes),
        max(b[3] for b in bboxes),
    ]
    [[start, end]] = collection.extent.temporal.intervals
    assert start == min(i.datetime for i in items.values()) and end == max(i.datetime for i in items.values())
    landuse = collection.item_assets["landuse"]
    names = [c.name for c in ClassificationExtension.ext(landuse).classes if not c.nodata]
    assert names == list(config.models["landuse"].classes)


def raw_hrefs(raw: dict) -> list[str]:
    return [a["href"] for a in raw["assets"].values()]


def test_items_and_collection_read_back_with_pystac(published, config):
    _check_outputs(published / "out", config, set(SCENES))


def test_links_are_relative_so_a_copy_resolves(published, config, tmp_path):
    copy = tmp_path / "elsewhere" / "out"
    shutil.copytree(published / "out", copy)
    _check_outputs(copy, config, set(SCENES))  # every href resolves under the copy
    for path in [copy / COLLECTION_FILE, *copy.rglob("*.stac.json")]:
        assert str(published / "out") not in path.read_text()  # no absolute path to the original


def test_incremental_run_keeps_every_scene_in_the_collection(published, config, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(published / "out", out)  # the earlier runs' outputs, in an output folder of its own
    write_scene(published / "in" / "sub" / "later.tif", size=256, seed=33)
    try:
        report = run([str(published / "in")], out, config, progress=False, recursive=True)
    finally:
        (published / "in" / "sub" / "later.tif").unlink()
        shutil.rmtree(published / "in" / "sub" / "later.truth", ignore_errors=True)
    assert report.ok and (report.processed, report.skipped) == (1, 2), report.failures
    _check_outputs(out, config, set(SCENES) | {"sub/later"})
    links = [link["href"] for link in json.loads((out / COLLECTION_FILE).read_text())["links"] if link["rel"] == "item"]
    assert links == ["./sub/deep/deep.stac.json", "./sub/later/later.stac.json", "./top/top.stac.json"]


def test_item_of_a_grid_without_epsg_code_and_with_acquisition_time(tmp_path, config):
    """A CRS no authority knows is written as WKT2; an acquisition time in the metadata is the datetime;
    ids and links of nested folders; a grid across the antimeridian keeps west > east."""
    crs = "+proj=aea +lat_1=29.5 +lat_2=45.5 +lat_0=37.5 +lon_0=-96 +datum=WGS84 +units=m"
    path = tmp_path / "x.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=40,
        height=30,
        count=1,
        dtype="uint8",
        crs=crs,
        transform=Affine(30.0, 0, -200000.0, 0, -30.0, 100000.0),
    ) as ds:
        ds.update_tags(ACQUISITIONDATETIME="2021-06-01 10:32:15")
    info = inspect_scene(str(path), "a/b/x")
    folder = tmp_path / "staging"
    folder.mkdir()
    (folder / "x_landuse.tif").write_bytes(b"")
    (folder / "x_quicklook.png").write_bytes(b"")
    (folder / "x_landuse.parquet").write_bytes(b"")
    (folder / "checkpoint.json").write_text("{}")  # a checkpoint stamp is no asset
    item = scene_item(folder, info, config, "out", {"run": "r1", "config": "c1"})
    data = item.to_dict(include_self_link=False, transform_hrefs=False)
    assert data["id"] == "a%2Fb%2Fx" and data["collection"] == "out"
    assert {link["href"] for link in data["links"]} == {"../../../collection.json"}
    assert data["properties"]["proj:code"] is None and "PROJCRS" in data["properties"]["proj:wkt2"]
    assert item.datetime == datetime(2021, 6, 1, 10, 32, 15, tzinfo=timezone.utc)
    assert data["properties"]["geoseg:datetime"] == "acquisition" and data["properties"]["geoseg:run"] == "r1"
    assert set(item.assets) == {"landuse", "quicklook", "landuse_geoparquet"}
    assert item.assets["quicklook"].roles == ["overview", "thumbnail"]
    assert item.assets["landuse_geoparquet"].media_type == "application/vnd.apache.parquet"
    west, south, east, north = transform_bounds(crs, "EPSG:4326", -200000.0, 99100.0, -198800.0, 100000.0)
    assert item.bbox[0] <= west and item.bbox[2] >= east and item.bbox[1] <= south and item.bbox[3] >= north
    # Across the antimeridian (a UTM zone 1 grid reaching into zone 60).
    with rasterio.open(
        tmp_path / "am.tif",
        "w",
        driver="GTiff",
        width=100,
        height=100,
        count=1,
        dtype="uint8",
        crs="EPSG:32601",
        transform=Affine(2000.0, 0, 300000.0, 0, -2000.0, 7000000.0),
    ):
        pass
    am = scene_item(folder, inspect_scene(str(tmp_path / "am.tif")), config, "out")
    assert am.bbox[0] > am.bbox[2] and am.geometry["type"] == "MultiPolygon"
    assert collection_id(str(tmp_path / "runs" / "nightly")) == "nightly"
    assert collection_id("s3://bucket/prefix/out/") == "out" and collection_id("s3://bucket") == "bucket"


def test_collection_leaves_out_scenes_without_a_usable_item(tmp_path, config):
    """A scene without an Item (published by an older geoseg) or with a broken one is left out; with
    no Item at all no collection.json is written."""
    from geoseg.core.storage import OutputStore
    from geoseg.outputs.stac_collection import write_collection

    out = tmp_path / "out"
    store = OutputStore(out)
    manifest = {
        "/in/a.tif": {"status": "ok", "output": "a"},
        "/in/old.tif": {"status": "ok", "output": "old"},
        "/in/b.tif": {"status": "failed", "output": "b"},
        "/in/c.tif": {"status": "failed"},
    }
    assert not write_collection(store, manifest) and not (out / COLLECTION_FILE).exists()
    path = tmp_path / "a.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=10,
        height=10,
        count=1,
        dtype="uint8",
        crs="EPSG:32618",
        transform=Affine(10.0, 0, 500000.0, 0, -10.0, 4300000.0),
    ):
        pass
    for name, text in (("a", None), ("old", ""), ("b", '{"type": "Feature", "bbox": [0, 0]}')):
        (out / name).mkdir(parents=True)
        if text is None:
            item = scene_item(out / name, inspect_scene(str(path), name), config, "out")
            text = json.dumps(item.to_dict(include_self_link=False, transform_hrefs=False))
        if text:
            (out / name / f"{name}.stac.json").write_text(text)
    assert write_collection(store, manifest)
    collection = pystac.Collection.from_file(str(out / COLLECTION_FILE))
    assert [item.id for item in collection.get_items()] == ["a"]
