"""geoseg.core.storage against a real S3 API (moto's server on 127.0.0.1) and a local folder; no Ray."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import boto3
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from geoseg.core.errors import InputError, OutputError
from geoseg.core.s3 import apply_storage_env, gdal_path, is_s3, list_rasters, storage_env
from geoseg.core.storage import OutputStore


def _s3():
    return boto3.session.Session().client("s3")


def _get(bucket: str, key: str) -> bytes:
    return _s3().get_object(Bucket=bucket, Key=key)["Body"].read()


def _keys(bucket: str, prefix: str = "") -> set[str]:
    return {o["Key"] for o in _s3().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}


def _write_geotiff(path: Path) -> np.ndarray:
    data = np.arange(3 * 40 * 50, dtype=np.uint16).reshape(3, 40, 50)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=50,
        height=40,
        count=3,
        dtype="uint16",
        crs="EPSG:32633",
        transform=from_origin(500000, 4000000, 10, 10),
    ) as dst:
        dst.write(data)
    return data


def _fill(staging: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        (staging / name).write_bytes(content)


# --------------------------------------------------------------------------- paths and environment


def test_is_s3_and_gdal_path() -> None:
    assert is_s3("s3://bkt/a.tif") and is_s3("S3://bkt") and not is_s3("/vsis3/bkt/a.tif")
    assert not is_s3("out/scene") and not is_s3(Path("s3:/x"))
    assert gdal_path("s3://bkt/dir/a.tif") == "/vsis3/bkt/dir/a.tif"
    assert gdal_path("scenes/a.tif") == "scenes/a.tif"
    assert gdal_path("/data/a.tif") == "/data/a.tif"
    assert gdal_path("/vsis3/bkt/a.tif") == "/vsis3/bkt/a.tif"
    assert gdal_path("/vsicurl/https://host/a.tif") == "/vsicurl/https://host/a.tif"


def _clear_storage_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith(("AWS_", "GDAL_", "CPL_", "VSI", "CURL_CA_BUNDLE")):
            monkeypatch.delenv(k)


def test_storage_env_derives_gdal_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_storage_env(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.local:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "3")
    monkeypatch.setenv("CPL_VSIL_CURL_CHUNK_SIZE", "1048576")
    monkeypatch.setenv("GDAL_CACHEMAX", "64")  # not a storage setting: stays the worker's own
    monkeypatch.setenv("HOME_NOT_STORAGE", "x")
    assert storage_env() == {
        "AWS_ENDPOINT_URL": "http://minio.local:9000",
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_REGION": "eu-west-1",
        "GDAL_HTTP_MAX_RETRY": "3",
        "CPL_VSIL_CURL_CHUNK_SIZE": "1048576",
        "AWS_S3_ENDPOINT": "minio.local:9000",
        "AWS_HTTPS": "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE",
    }
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://s3.example.org")
    env = storage_env()
    assert (env["AWS_S3_ENDPOINT"], env["AWS_HTTPS"], env["AWS_VIRTUAL_HOSTING"]) == ("s3.example.org", "YES", "FALSE")
    # the S3-specific endpoint wins, as in boto3; an explicit virtual-hosting choice is kept
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://10.0.0.5:8333/")
    monkeypatch.setenv("AWS_VIRTUAL_HOSTING", "TRUE")
    env = storage_env()
    assert (env["AWS_S3_ENDPOINT"], env["AWS_HTTPS"], env["AWS_VIRTUAL_HOSTING"]) == ("10.0.0.5:8333", "NO", "TRUE")
    # an explicit GDAL endpoint is left alone
    monkeypatch.setenv("AWS_S3_ENDPOINT", "gdal.example.org")
    env = storage_env()
    assert env["AWS_S3_ENDPOINT"] == "gdal.example.org" and "AWS_HTTPS" not in env
    # no endpoint: plain AWS, nothing derived
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_S3_ENDPOINT", "AWS_VIRTUAL_HOSTING"):
        monkeypatch.delenv(k)
    env = storage_env()
    assert "AWS_S3_ENDPOINT" not in env and "AWS_HTTPS" not in env and "AWS_VIRTUAL_HOSTING" not in env


def test_apply_storage_env_sets_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_S3_ENDPOINT", raising=False)
    monkeypatch.delenv("GDAL_HTTP_TIMEOUT", raising=False)
    apply_storage_env({"AWS_S3_ENDPOINT": "host:1234", "GDAL_HTTP_TIMEOUT": "30"})
    assert os.environ["AWS_S3_ENDPOINT"] == "host:1234" and os.environ["GDAL_HTTP_TIMEOUT"] == "30"


def test_rasterio_reads_geotiff_from_s3(
    s3_server: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _write_geotiff(tmp_path / "scene.tif")
    _s3().upload_file(str(tmp_path / "scene.tif"), s3_bucket, "in/scene.tif")
    # GDAL's variables come from AWS_ENDPOINT_URL alone, as on a worker that gets storage_env()
    for k in ("AWS_S3_ENDPOINT", "AWS_HTTPS", "AWS_VIRTUAL_HOSTING"):
        monkeypatch.delenv(k)
    env = storage_env()
    assert env["AWS_S3_ENDPOINT"] == s3_server.removeprefix("http://") and env["AWS_HTTPS"] == "NO"
    apply_storage_env(env)
    with rasterio.open(gdal_path(f"s3://{s3_bucket}/in/scene.tif")) as src:
        assert (src.count, src.width, src.height, src.crs.to_epsg()) == (3, 50, 40, 32633)
        np.testing.assert_array_equal(src.read(), data)
        np.testing.assert_array_equal(src.read(2, window=((5, 15), (10, 30))), data[1, 5:15, 10:30])


def test_list_rasters(s3_bucket: str) -> None:
    s3 = _s3()
    for key in (
        "scenes/a.tif",
        "scenes/B.TIF",
        "scenes/c.Tiff",
        "scenes/notes.txt",
        "scenes/d.tif.aux.xml",
        "scenes/sub/e.tif",
        "scenes/",
        "other/f.tif",
        "top.tif",
    ):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    expected = [f"s3://{s3_bucket}/scenes/{n}" for n in ("B.TIF", "a.tif", "c.Tiff")]
    assert list_rasters(f"s3://{s3_bucket}/scenes/") == expected
    assert list_rasters(f"s3://{s3_bucket}/scenes") == expected
    assert list_rasters(f"s3://{s3_bucket}") == [f"s3://{s3_bucket}/top.tif"]
    assert list_rasters(f"s3://{s3_bucket}/empty/") == []
    deep = expected + [f"s3://{s3_bucket}/scenes/sub/e.tif"]
    assert list_rasters(f"s3://{s3_bucket}/scenes/", recursive=True) == sorted(deep)
    # Output names mirror the keys below the prefix; a prefix without its slash is a prefix too.
    from geoseg.raster.discover import find_inputs

    found, errors = find_inputs([f"s3://{s3_bucket}/scenes"], recursive=True)
    assert not errors and {f.path: f.name for f in found} == {
        f"s3://{s3_bucket}/scenes/{k}": v
        for k, v in (("B.TIF", "B"), ("a.tif", "a"), ("c.Tiff", "c"), ("sub/e.tif", "sub/e"))
    }
    found, errors = find_inputs([f"s3://{s3_bucket}/other/f.tif", f"s3://{s3_bucket}/empty/"])
    assert [(f.path, f.name) for f in found] == [(f"s3://{s3_bucket}/other/f.tif", "f")]
    assert [e.path for e in errors] == [f"s3://{s3_bucket}/empty/"]


def test_list_rasters_missing_bucket(s3_server: str) -> None:
    with pytest.raises(InputError) as info:
        list_rasters("s3://geoseg-no-such-bucket/scenes/")
    assert str(info.value) == "s3://geoseg-no-such-bucket/scenes/: bucket does not exist (NoSuchBucket)"


# --------------------------------------------------------------------------- OutputStore on S3


def test_s3_publish_uploads_files_and_manifest(s3_bucket: str) -> None:
    store = OutputStore(f"s3://{s3_bucket}/out")
    assert store.remote and store.location == f"s3://{s3_bucket}/out"
    store.check_writable()
    files = {
        "scene_landuse.tif": os.urandom(300_000),
        "scene.gpkg": b"gpkg" * 1000,
        "summary.json": json.dumps({"status": "ok"}).encode(),
    }
    staging = store.staging_dir("scene")
    assert staging.is_dir() and not any(staging.iterdir()) and staging.name.startswith("geoseg-scene-")
    _fill(staging, files)
    store.publish(staging, "scene")
    assert not staging.exists()
    assert _keys(s3_bucket) == {f"out/scene/{n}" for n in files} | {"out/scene/manifest.json"}
    for name, content in files.items():
        assert _get(s3_bucket, f"out/scene/{name}") == content
    manifest = json.loads(store.read_text("scene/manifest.json"))
    assert manifest["files"] == {
        n: {"bytes": len(c), "sha256": hashlib.sha256(c).hexdigest()} for n, c in files.items()
    }
    assert manifest["published"].startswith("20")
    assert json.loads(store.read_text("scene/summary.json")) == {"status": "ok"}
    assert store.read_text("scene/nothing.json") is None
    assert store.uri("scene/scene.gpkg") == f"s3://{s3_bucket}/out/scene/scene.gpkg"
    assert store.uri() == f"s3://{s3_bucket}/out"


def test_s3_multipart_upload(s3_bucket: str) -> None:
    store = OutputStore(f"s3://{s3_bucket}/deep/out/")
    content = os.urandom(9 * 1024 * 1024)  # above boto3's 8 MiB multipart threshold
    staging = store.staging_dir("big")
    _fill(staging, {"big.tif": content})
    store.publish(staging, "big")
    assert _get(s3_bucket, "deep/out/big/big.tif") == content
    assert json.loads(store.read_text("big/manifest.json"))["files"]["big.tif"]["bytes"] == len(content)


def test_s3_half_published_scene_is_not_there(s3_bucket: str) -> None:
    """A publish that died before its manifest (files uploaded, no marker) is not a scene."""
    s3 = _s3()
    s3.put_object(Bucket=s3_bucket, Key="out/crashed/summary.json", Body=b'{"status": "ok"}')
    s3.put_object(Bucket=s3_bucket, Key="out/crashed/crashed.gpkg", Body=b"half")
    store = OutputStore(f"s3://{s3_bucket}/out")
    assert store.read_text("crashed/summary.json") is None
    assert store.read_text("crashed/manifest.json") is None
    s3.put_object(Bucket=s3_bucket, Key="out/crashed/manifest.json", Body=b'{"files": {}}')
    assert store.read_text("crashed/summary.json") == '{"status": "ok"}'


def test_s3_republish_replaces_and_removes_stale(s3_bucket: str) -> None:
    store = OutputStore(f"s3://{s3_bucket}/out")
    first = store.staging_dir("scene")
    _fill(first, {"a.tif": b"old a", "stale.gpkg": b"old only", "summary.json": b'{"run": 1}'})
    store.publish(first, "scene")
    # a neighbouring scene whose name shares the prefix must not be touched
    other = store.staging_dir("scene2")
    _fill(other, {"a.tif": b"other"})
    store.publish(other, "scene2")

    second = store.staging_dir("scene")
    _fill(second, {"a.tif": b"new a", "b.tif": b"new b", "summary.json": b'{"run": 2}'})
    store.publish(second, "scene")
    assert _keys(s3_bucket, "out/scene/") == {
        "out/scene/a.tif",
        "out/scene/b.tif",
        "out/scene/summary.json",
        "out/scene/manifest.json",
    }
    assert _get(s3_bucket, "out/scene/a.tif") == b"new a"
    assert _get(s3_bucket, "out/scene/b.tif") == b"new b"
    assert store.read_text("scene/summary.json") == '{"run": 2}'
    assert set(json.loads(store.read_text("scene/manifest.json"))["files"]) == {"a.tif", "b.tif", "summary.json"}
    assert _get(s3_bucket, "out/scene2/a.tif") == b"other"
    assert store.read_text("scene2/manifest.json") is not None


def test_s3_discard_keeps_published_scene(s3_bucket: str) -> None:
    store = OutputStore(f"s3://{s3_bucket}/out")
    staging = store.staging_dir("scene")
    _fill(staging, {"a.tif": b"good"})
    store.publish(staging, "scene")
    failed = store.staging_dir("scene")
    _fill(failed, {"a.tif": b"bad"})
    store.discard(failed)
    assert not failed.exists()
    assert _get(s3_bucket, "out/scene/a.tif") == b"good"
    assert store.read_text("scene/a.tif") == "good"


def test_s3_write_text_and_read_text(s3_bucket: str) -> None:
    store = OutputStore(f"s3://{s3_bucket}")
    assert store.read_text("summary.csv") is None
    store.write_text("summary.csv", "input,status\na.tif,ok\n")
    assert _get(s3_bucket, "summary.csv") == b"input,status\na.tif,ok\n"
    assert store.read_text("summary.csv") == "input,status\na.tif,ok\n"
    store.write_text("summary.csv", "input,status\n")
    assert store.read_text("summary.csv") == "input,status\n"
    assert store.uri("summary.csv") == f"s3://{s3_bucket}/summary.csv"


def test_s3_check_writable_missing_bucket(s3_server: str) -> None:
    store = OutputStore("s3://geoseg-missing-bucket/out")
    with pytest.raises(OutputError) as info:
        store.check_writable()
    message = str(info.value)
    assert message == "s3://geoseg-missing-bucket/out: bucket does not exist (NoSuchBucket)"
    assert "\n" not in message and "<" not in message
    with pytest.raises(OutputError) as info:
        store.write_text("summary.csv", "x")
    assert str(info.value) == (
        "s3://geoseg-missing-bucket/out/summary.csv: cannot write: bucket does not exist (NoSuchBucket)"
    )


def test_s3_unreachable_endpoint_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(OutputError) as info:
        OutputStore("s3://bkt/out").check_writable()
    message = str(info.value)
    assert message.startswith("s3://bkt/out: Could not connect to the endpoint URL") and "\n" not in message


# --------------------------------------------------------------------------- OutputStore on disk


def test_local_store(tmp_path: Path) -> None:
    out = tmp_path / "out"
    store = OutputStore(out)
    assert not store.remote and store.location == str(out)
    store.check_writable()
    assert out.is_dir() and list(out.iterdir()) == []

    staging = store.staging_dir("scene")
    assert staging == out / ".scene.partial" and staging.is_dir()
    _fill(staging, {"a.tif": b"old a", "stale.gpkg": b"old", "summary.json": b'{"run": 1}'})
    assert store.read_text("scene/summary.json") is None  # not published yet
    store.publish(staging, "scene")
    assert not staging.exists()
    assert sorted(p.name for p in (out / "scene").iterdir()) == ["a.tif", "manifest.json", "stale.gpkg", "summary.json"]
    manifest = json.loads(store.read_text("scene/manifest.json"))
    assert manifest["files"]["a.tif"] == {"bytes": 5, "sha256": hashlib.sha256(b"old a").hexdigest()}

    # a left-over staging folder is emptied; republishing replaces the whole scene
    left = store.staging_dir("scene")
    (left / "junk").write_bytes(b"junk")
    staging = store.staging_dir("scene")
    assert list(staging.iterdir()) == []
    _fill(staging, {"a.tif": b"new a", "summary.json": b'{"run": 2}'})
    store.publish(staging, "scene")
    assert sorted(p.name for p in (out / "scene").iterdir()) == ["a.tif", "manifest.json", "summary.json"]
    assert (out / "scene" / "a.tif").read_bytes() == b"new a"
    assert store.read_text("scene/summary.json") == '{"run": 2}'
    assert set(json.loads(store.read_text("scene/manifest.json"))["files"]) == {"a.tif", "summary.json"}
    assert sorted(p.name for p in out.iterdir()) == ["scene"]  # no .old / .partial left behind

    # a failed scene: its staging goes, the published scene stays
    failed = store.staging_dir("scene")
    _fill(failed, {"a.tif": b"bad"})
    store.discard(failed)
    assert not failed.exists() and (out / "scene" / "a.tif").read_bytes() == b"new a"
    with pytest.raises(ValueError):
        store.discard(out / "scene")
    assert (out / "scene").is_dir()

    store.write_text("summary.csv", "input,status\n")
    assert (out / "summary.csv").read_text() == "input,status\n"
    store.write_text("summary.csv", "input,status\na.tif,ok\n")
    assert store.read_text("summary.csv") == "input,status\na.tif,ok\n"
    assert sorted(p.name for p in out.iterdir()) == ["scene", "summary.csv"]
    assert store.read_text("missing/summary.json") is None
    assert store.uri("scene/a.tif") == os.path.join(str(out), "scene/a.tif") and store.uri() == str(out)


def test_local_check_writable_fails_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputError) as info:
        OutputStore(blocker / "out").check_writable()
    assert str(info.value).startswith(f"{blocker / 'out'}: output folder is not writable (")
    assert "\n" not in str(info.value)
