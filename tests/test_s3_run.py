"""Object storage in and out, through the real pipeline and a real S3 API (moto's server on 127.0.0.1):
inputs listed and read from a bucket prefix by the workers, outputs published under a prefix with
their manifest last, equal to a local run's."""

from __future__ import annotations

import json

import boto3
import numpy as np
import rasterio

from geoseg.core.config import load_config
from geoseg.core.storage import MANIFEST
from geoseg.runner.pipeline import run


def test_s3_in_and_out_equals_local_run(ray_session, s3_server, s3_bucket, synth_scene, oracle_config_path, tmp_path):
    s3 = boto3.session.Session().client("s3", endpoint_url=s3_server)
    s3.upload_file(str(synth_scene), s3_bucket, "in/scene.tif")
    s3.put_object(Bucket=s3_bucket, Key="in/broken.TIF", Body=b"not a GeoTIFF")
    s3.put_object(Bucket=s3_bucket, Key="in/notes.txt", Body=b"ignored")
    config = load_config(oracle_config_path, {"tiling": {"tile_size": 512, "halo": 32}})

    report = run([f"s3://{s3_bucket}/in/"], f"s3://{s3_bucket}/out", config, progress=False)
    assert [s["input"] for s in report.summaries] == [f"s3://{s3_bucket}/in/scene.tif"]
    [(bad, error)] = report.failures
    assert bad == f"s3://{s3_bucket}/in/broken.TIF" and bad in error and "\n" not in error

    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="out/")["Contents"]}
    names = [
        "scene.gpkg",
        "scene_landuse.tif",
        "scene_buildings.tif",
        "scene_ships.tif",
        "summary.json",
        MANIFEST,
        "scene_landuse.qml",
        "scene_buildings.qml",
        "scene_ships.qml",
        "scene.stac.json",
        "scene_quicklook.png",
    ]
    run_record = f"out/runs/{report.run_id}.json"
    assert keys == {f"out/scene/{n}" for n in names} | {
        "out/summary.csv",
        "out/run-manifest.json",
        run_record,
        "out/collection.json",
        "out/report.html",
    }
    manifest = json.loads(s3.get_object(Bucket=s3_bucket, Key=f"out/scene/{MANIFEST}")["Body"].read())
    assert set(manifest["files"]) == set(names) - {MANIFEST}
    for name, entry in manifest["files"].items():
        assert s3.head_object(Bucket=s3_bucket, Key=f"out/scene/{name}")["ContentLength"] == entry["bytes"]
    csv_text = s3.get_object(Bucket=s3_bucket, Key="out/summary.csv")["Body"].read().decode()
    assert "broken.TIF,failed" in csv_text
    # A rerun knows the object by its ETag: nothing to redo but the broken input.
    again = run([f"s3://{s3_bucket}/in/"], f"s3://{s3_bucket}/out", config, progress=False)
    assert (again.processed, again.skipped, len(again.failures)) == (0, 1, 1)
    entry = json.loads(s3.get_object(Bucket=s3_bucket, Key="out/run-manifest.json")["Body"].read())["inputs"][
        f"s3://{s3_bucket}/in/scene.tif"
    ]
    assert entry["run"] == report.run_id and entry["fingerprint"]["etag"]

    local = run([str(synth_scene)], tmp_path / "local", config, progress=False)
    assert local.ok, local.failures
    assert report.summaries[0]["models"] == local.summaries[0]["models"]
    for head in ("landuse", "buildings", "ships"):
        with (
            rasterio.open(f"/vsis3/{s3_bucket}/out/scene/scene_{head}.tif") as remote,
            rasterio.open(tmp_path / "local" / "scene" / f"scene_{head}.tif") as here,
        ):
            assert remote.crs == here.crs and remote.transform == here.transform
            a, b = remote.read(1), here.read(1)
            if head == "landuse":
                assert (a == b).all()
            else:  # instance ids may be numbered in another order
                assert ((a > 0) == (b > 0)).all() and len(np.unique(a)) == len(np.unique(b))
