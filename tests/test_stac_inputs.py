"""STAC Items as inputs: the sen2ships band files (one GeoTIFF per band) described by Items that the
tests write with pystac, run without stacking them by hand."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import rasterio.warp
from helpers.stac_items import band_item
from rasterio.enums import Resampling

from geoseg.core.config import config_from_dict, load_config
from geoseg.raster.stac_input import item_vrt, load_item
from geoseg.runner.pipeline import run

REPO = Path(__file__).resolve().parents[1]
CLOUDS = REPO / "configs" / "sentinel2-clouds.yaml"


@pytest.fixture(scope="module")
def cartagena(shared_data, tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("ukis_csmask")
    from helpers.sentinel2 import band_files, stack

    d = tmp_path_factory.mktemp("stac")
    files = dict(zip(("B02", "B03", "B04", "B08"), band_files(shared_data, "cartagena")))
    files["B11"] = next((shared_data / "sen2ships" / "cartagena").glob("*L2A_B11_*.tif*"))
    return {"dir": d, "stack": stack(shared_data, "cartagena", d / "stacked.tif"), **files}


def test_item_runs_like_the_bands_stacked_by_hand(ray_session, cartagena, tmp_path):
    """configs/sentinel2-clouds.yaml on an Item of the four band files: the mask equals that of the
    same bands stacked into one GeoTIFF on >= 99.9 % of pixels, on the same grid; the Item's id names
    the output folder and its datetime the STAC output's."""
    files = {b: cartagena[b] for b in ("B02", "B03", "B04", "B08")}
    item = band_item(tmp_path, "S2A_cartagena_20230730", files)
    item.properties.update({"platform": "sentinel-2a", "constellation": "sentinel-2", "eo:cloud_cover": 12.5})
    item.save_object(include_self_link=True)
    config = load_config(CLOUDS)
    by_hand = run([str(cartagena["stack"])], tmp_path / "hand", config, progress=False)
    from_item = run([item.get_self_href()], tmp_path / "item", config, progress=False)
    assert by_hand.ok and from_item.ok, (by_hand.failures, from_item.failures)
    with (
        rasterio.open(tmp_path / "hand" / "stacked" / "stacked_clouds.tif") as a,
        rasterio.open(tmp_path / "item" / "S2A_cartagena_20230730" / "S2A_cartagena_20230730_clouds.tif") as b,
    ):
        assert (a.transform, a.crs, a.shape) == (b.transform, b.crs, b.shape)
        share = float(np.mean(a.read(1) == b.read(1)))
    print(f"Item vs stacked by hand: {share:.4%} of pixels equal")
    assert share >= 0.999
    out = tmp_path / "item" / "S2A_cartagena_20230730"
    stac_out = json.loads((out / "S2A_cartagena_20230730.stac.json").read_text())
    props = stac_out["properties"]
    assert props["datetime"].startswith("2023-07-30T10:56")
    # Lineage: a link to the input Item, its platform and constellation; its own cloud cover kept apart
    # from the one geoseg measured.
    assert [link["href"] for link in stac_out["links"] if link["rel"] == "derived_from"] == [item.get_self_href()]
    assert (props["platform"], props["constellation"], props["geoseg:input_cloud_cover"]) == (
        "sentinel-2a",
        "sentinel-2",
        12.5,
    )
    measured = json.loads((out / "summary.json").read_text())["cloud_cover"]
    assert props["eo:cloud_cover"] == pytest.approx(measured) and measured != 12.5


def test_a_coarser_band_is_resampled_onto_the_finest_grid(cartagena, tmp_path):
    """B11 written at 20 m by the test (2 x 2 average) beside the 10 m bands: the VRT puts it on the
    10 m grid (bilinear), close to the real 10 m B11; the Item's scale and offset go to the head."""
    with rasterio.open(cartagena["B11"]) as ds:
        profile, full = ds.profile, ds.read(1)
        h, w = ds.height // 2, ds.width // 2
        coarse = ds.read(
            1, out_shape=(h, w), resampling=Resampling.average, window=rasterio.windows.Window(0, 0, w * 2, h * 2)
        )
        profile.update(width=w, height=h, transform=ds.transform * ds.transform.scale(2, 2))
    b11_20m = tmp_path / "B11_20m.tif"
    with rasterio.open(b11_20m, "w", **profile) as out:
        out.write(coarse, 1)
    files = {b: cartagena[b] for b in ("B02", "B03", "B04")} | {"B11": b11_20m}
    item = band_item(tmp_path, "mixed", files, offset=-0.1)
    head = {
        "task": "semantic",
        "classes": ["a", "b"],
        "bands": [1, 2, 3, 4],
        "factory": "x.py:y",
        "normalize": {"mean": [0, 0, 0, 0], "std": [1, 1, 1, 1], "scale": 0.0001},
        "input": {"names": ["blue", "green", "red", "swir16"]},
    }
    config = config_from_dict({"models": {"m": head}})
    vrt, scale_offsets = item_vrt("mixed.json", item, config)
    assert scale_offsets == {"m": (0.0001, -0.1)}
    with rasterio.open(vrt) as ds, rasterio.open(cartagena["B02"]) as ref:
        assert (ds.count, ds.transform, ds.shape) == (4, ref.transform, ref.shape)
        swir = ds.read(4).astype(float)
    inner = (slice(2, 2 * h - 2), slice(2, 2 * w - 2))  # away from the edges the 20 m band does not cover
    error = np.abs(swir[inner] - full[inner]) / np.maximum(full[inner], 1)
    print(f"B11 from 20 m vs the real 10 m: median relative error {np.median(error):.3%}")
    assert np.median(error) < 0.05


def test_item_without_a_band_fails_with_its_name_and_the_bands_it_has(ray_session, cartagena, tmp_path):
    files = {b: cartagena[b] for b in ("B02", "B03", "B04")}
    collection = pystac.ItemCollection(
        [band_item(tmp_path, "no_nir", files), band_item(tmp_path, "all_four", files | {"B08": cartagena["B08"]})]
    )
    path = tmp_path / "items.json"
    collection.save_object(str(path))
    report = run([str(path)], tmp_path / "out", load_config(CLOUDS), progress=False)
    assert [p for p, _ in report.failures] == [f"{path}#no_nir"]
    error = report.failures[0][1]
    assert error == (
        f"{path}#no_nir: Item no_nir has no band 'nir' (its bands: blue, green, red); map the models' "
        "bands to its assets or use another Item"
    )
    assert [s["output"] for s in report.summaries] == ["all_four"]
    assert load_item(f"{path}#all_four").id == "all_four"


def test_item_whose_file_is_missing_names_the_href(ray_session, cartagena, tmp_path):
    files = {b: cartagena[b] for b in ("B02", "B03", "B04")} | {"B08": tmp_path / "gone" / "B08.tif"}
    item = band_item(tmp_path, "broken", files)
    item.save_object(include_self_link=True)
    report = run([item.get_self_href()], tmp_path / "out", load_config(CLOUDS), progress=False)
    ((path, error),) = report.failures
    assert (
        path == item.get_self_href()
        and "band 'nir': cannot read" in error
        and str(tmp_path / "gone" / "B08.tif") in error
    )
    assert "\n" not in error and not (tmp_path / "out" / "broken").exists()


def test_item_whose_bands_lie_in_two_crss_is_refused_naming_both(ray_session, cartagena, tmp_path):
    """A band file in another CRS than the others (here B08's pixels labelled with UTM zone 30N)
    fails its Item in one line naming both bands, both CRSs and what to do; nothing is written."""
    with rasterio.open(cartagena["B08"]) as ds:
        profile, pixels, crs = ds.profile, ds.read(1), ds.crs
    other = rasterio.crs.CRS.from_epsg(32630)
    assert other != crs
    moved = tmp_path / "B08_other_zone.tif"
    with rasterio.open(moved, "w", **(profile | {"crs": other})) as out:
        out.write(pixels, 1)
    files = {b: cartagena[b] for b in ("B02", "B03", "B04")} | {"B08": moved}
    item = band_item(tmp_path, "two_crss", files)
    item.save_object(include_self_link=True)
    report = run([item.get_self_href()], tmp_path / "out", load_config(CLOUDS), progress=False)
    ((path, error),) = report.failures
    assert path == item.get_self_href() and "\n" not in error
    assert "band 'nir'" in error and "band 'blue'" in error and "warp the assets to one CRS first" in error
    assert str(other) in error and str(crs) in error
    assert not (tmp_path / "out" / "two_crss").exists()


def test_sentinel2_config_runs_ships_and_clouds_on_an_item(ray_session, shared_data, tmp_path):
    """configs/sentinel2.yaml (ships at 10 m, clouds at 30 m) on Honolulu's four band files as an
    Item: both masks on the 10 m grid, the ships counted, the cloud cover reported."""
    pytest.importorskip("ukis_csmask")
    from helpers.sentinel2 import band_files

    files = dict(zip(("B02", "B03", "B04", "B08"), band_files(shared_data, "honolulu")))
    item = band_item(tmp_path, "honolulu", files)
    item.save_object(include_self_link=True)
    report = run(
        [item.get_self_href()], tmp_path / "out", load_config(REPO / "configs" / "sentinel2.yaml"), progress=False
    )
    assert report.ok, report.failures
    out = tmp_path / "out" / "honolulu"
    summary = json.loads((out / "summary.json").read_text())
    import geopandas as gpd

    ships = gpd.read_file(out / "honolulu.gpkg", layer="ships")
    assert summary["models"]["ships"]["classes"]["ship"]["count"] == len(ships) and summary["cloud_model"] == "clouds"
    assert summary["cloud_cover"] < 5  # a clear day over Honolulu
    with rasterio.open(files["B02"]) as ref:
        for head in ("ships", "clouds"):
            with rasterio.open(out / f"honolulu_{head}.tif") as ds:
                assert (ds.transform, ds.shape) == (ref.transform, ref.shape), head


def test_items_done_are_skipped_and_an_updated_item_is_redone(ray_session, cartagena, tmp_path):
    """Nightly runs over an ItemCollection: the second run skips both Items; after one Item's
    `updated` time changes, the third run redoes that Item only."""
    files = {b: cartagena[b] for b in ("B02", "B03", "B04", "B08")}
    items = [band_item(tmp_path, name, files) for name in ("first", "second")]
    for item in items:
        item.properties["updated"] = "2023-07-31T00:00:00Z"
    path = tmp_path / "items.json"
    pystac.ItemCollection(items).save_object(str(path))
    config = load_config(CLOUDS, {"tiling": {"window": 128, "overlap": 32}})  # (faster: the grid is not under test)
    first = run([str(path)], tmp_path / "out", config, progress=False)
    assert first.ok and first.processed == 2 and first.skipped == 0, first.failures
    again = run([str(path)], tmp_path / "out", config, progress=False)
    assert again.processed == 0 and again.skipped == 2
    items[1].properties["updated"] = "2023-08-02T00:00:00Z"
    pystac.ItemCollection(items).save_object(str(path))
    third = run([str(path)], tmp_path / "out", config, progress=False)
    assert third.processed == 1 and third.skipped == 1
    assert [s["output"] for s in third.summaries if s["run"] == third.run_id] == ["second"]


def _band_crops(cartagena: dict[str, Path], folder: Path, side: int = 256) -> dict[str, Path]:
    """A ``side`` x ``side`` crop of each of the four band files (short runs), in ``folder``."""
    from rasterio.windows import Window

    folder.mkdir()
    files = {}
    for band in ("B02", "B03", "B04", "B08"):
        with rasterio.open(cartagena[band]) as src:
            window = Window(0, 0, side, side)
            profile = src.profile | {"width": side, "height": side, "transform": src.window_transform(window)}
            with rasterio.open(folder / f"{band}.tif", "w", **profile) as dst:
                dst.write(src.read(window=window))
        files[band] = folder / f"{band}.tif"
    return files


def _upload_item(local: Path, files: dict[str, Path], item_id: str, bucket: str) -> None:
    """An Item of ``files`` whose assets lie beside it (relative hrefs), uploaded with them to ``bucket/scenes/``."""
    import boto3

    item = band_item(local, item_id, files)
    item.make_asset_hrefs_relative()
    item.save_object(include_self_link=False)
    s3 = boto3.session.Session().client("s3")
    for path in local.iterdir():
        s3.upload_file(str(path), bucket, f"scenes/{path.name}")


def test_item_and_its_assets_on_s3(ray_session, cartagena, s3_bucket, tmp_path):
    """An Item on S3 (moto's server on 127.0.0.1) whose assets lie beside it (relative hrefs) runs
    as the same Item on disk does, and a rerun skips it by its assets' ETags."""
    local = tmp_path / "local"
    _upload_item(local, _band_crops(cartagena, local), "S2A_cartagena_s3", s3_bucket)
    href = f"s3://{s3_bucket}/scenes/S2A_cartagena_s3.json"
    config = load_config(CLOUDS)
    on_disk = run([str(local / "S2A_cartagena_s3.json")], tmp_path / "disk", config, progress=False)
    on_s3 = run([href], tmp_path / "s3", config, progress=False)
    assert on_disk.ok and on_s3.ok, (on_disk.failures, on_s3.failures)
    name = "S2A_cartagena_s3"
    with (
        rasterio.open(tmp_path / "disk" / name / f"{name}_clouds.tif") as a,
        rasterio.open(tmp_path / "s3" / name / f"{name}_clouds.tif") as b,
    ):
        assert (a.transform, a.shape) == (b.transform, b.shape) and (a.read(1) == b.read(1)).all()
    again = run([href], tmp_path / "s3", config, progress=False)
    assert again.ok and again.skipped == 1


@pytest.fixture
def http_bucket() -> Iterator[tuple[str, str]]:
    """A public-read bucket of an S3 API in its own process (moto's server on 127.0.0.1), read over
    plain HTTP without credentials as public buckets serve STAC assets; yields (endpoint, bucket).
    Its own process: GDAL holds the GIL while it opens a URL, so a server thread in this process
    could never answer the driver."""
    import subprocess
    import sys
    import time
    import urllib.request

    import boto3
    from helpers.pgstac import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="public-scenes")
        yield endpoint, "public-scenes"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_item_over_http_is_skipped_by_its_assets_etags_and_redone_when_one_changes(
    ray_session, cartagena, s3_server, http_bucket, tmp_path
):
    """An Item and its band files read over plain HTTP (an S3 API answering anonymous GET and HEAD
    for public objects, as public buckets serve STAC assets over https): the second run skips the
    Item by its assets' ETags (HEAD requests), and after one band file is replaced the third redoes it."""
    import boto3

    endpoint, bucket = http_bucket
    s3 = boto3.client("s3", endpoint_url=endpoint)  # uploads use s3_server's dummy credentials; reads use none
    local = tmp_path / "local"
    files = _band_crops(cartagena, local, side=128)
    item = band_item(local, "S2A_cartagena_http", files)
    item.make_asset_hrefs_relative()
    item.save_object(include_self_link=False)
    for path in local.iterdir():
        s3.upload_file(str(path), bucket, f"scenes/{path.name}", ExtraArgs={"ACL": "public-read"})
    url = f"{endpoint}/{bucket}/scenes/S2A_cartagena_http.json"
    config = load_config(CLOUDS, {"tiling": {"window": 128, "overlap": 32}})  # (faster: the grid is not under test)
    first = run([url], tmp_path / "out", config, progress=False)
    assert first.ok and first.processed == 1, first.failures
    assets = first.summaries[0]["fingerprint"]["assets"]
    assert sorted(assets) == ["B02", "B03", "B04", "B08"] and all(a["etag"] and a["bytes"] > 0 for a in assets.values())
    again = run([url], tmp_path / "out", config, progress=False)
    assert again.ok and (again.processed, again.skipped) == (0, 1)
    with rasterio.open(files["B08"], "r+") as ds:  # one pixel of the near infrared band changes
        pixels = ds.read(1)
        pixels[0, 0] += 1
        ds.write(pixels, 1)
    s3.upload_file(str(files["B08"]), bucket, "scenes/B08.tif", ExtraArgs={"ACL": "public-read"})
    third = run([url], tmp_path / "out", config, progress=False)
    assert third.ok and (third.processed, third.skipped) == (1, 0), third.failures


def test_a_config_maps_bands_to_assets_by_name(cartagena, tmp_path):
    """A head's ``input.names`` in the config (it overrides the model's contract) may name the
    Item's bands or asset keys themselves: [B04, B03, B02] stacks red, green, blue in that order."""
    files = {b: cartagena[b] for b in ("B02", "B03", "B04")}
    item = band_item(tmp_path, "mapped", files)
    head = {
        "task": "semantic",
        "classes": ["a", "b"],
        "bands": [1, 2, 3],
        "factory": "x.py:y",
        "input": {"names": ["B04", "B03", "B02"]},
    }
    vrt, _ = item_vrt("mapped.json", item, config_from_dict({"models": {"m": head}}))
    with rasterio.open(vrt) as ds:
        stacked = ds.read()
    for k, band in enumerate(("B04", "B03", "B02")):
        with rasterio.open(files[band]) as src:
            assert (stacked[k] == src.read(1)).all(), band
