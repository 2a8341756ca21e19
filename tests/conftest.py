"""Shared fixtures: one local Ray per test session, real data paths, synthetic scenes."""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Third-party sample files stay in ../shared/data (beside the checkout, in CI too), never copied here.
SHARED_DATA = REPO.parent / "shared" / "data"
# Traced copies of the networks (geoseg.models.traced) go to the session's own folder, not the
# user's cache: set before any Ray starts, so that its workers inherit it.
_NETWORK_CACHE = tempfile.mkdtemp(prefix="geoseg-test-cache-")
os.environ.setdefault("GEOSEG_CACHE_DIR", _NETWORK_CACHE)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_NETWORK_CACHE, ignore_errors=True)


def pytest_report_header(config: pytest.Config) -> list[str]:
    import rasterio
    import ray
    import torch

    return [
        f"geoseg stack: GDAL {rasterio.__gdal_version__}, rasterio {rasterio.__version__}, torch {torch.__version__} "
        f"(CUDA {'yes' if torch.cuda.is_available() else 'no'}), Ray {ray.__version__}, "
        f"Python {platform.python_version()}"
    ]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting one costs seconds).

    ``num_gpus=1`` is declared on purpose: the GPU scheduling path (actors with ``num_gpus=1``)
    runs on CPU machines too, and the actor picks its device from ``torch.cuda.is_available()``.
    """
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            num_gpus=1,
            include_dashboard=False,
            object_store_memory=300 * 1024**2,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real imagery, see its SOURCES.md); tests that need it skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA} (the shared/ folder beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def oracle_config_path() -> Path:
    return REPO / "configs" / "synthetic-oracle.yaml"


@pytest.fixture(scope="session")
def synth_scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1536 x 1536 synthetic scene (objects on seams, corners, longer than a 1024 tile, nodata corner)."""
    from geoseg.train.synth import write_scene

    d = tmp_path_factory.mktemp("synth")
    path = d / "scene.tif"
    write_scene(path, size=1536, seed=3)
    return path


_S3_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_S3_ENDPOINT",
    "AWS_HTTPS",
    "AWS_VIRTUAL_HOSTING",
    "AWS_NO_SIGN_REQUEST",
    "CPL_AWS_AUTODETECT_EC2",
)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server) on 127.0.0.1 for the session; yields its endpoint URL.

    The environment points boto3 (AWS_ENDPOINT_URL) and GDAL's /vsis3/ (AWS_S3_ENDPOINT,
    AWS_HTTPS, AWS_VIRTUAL_HOSTING) at it, with dummy credentials; restored at the end.
    """
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    for k in _S3_ENV:
        os.environ.pop(k, None)
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_S3_ENDPOINT": f"127.0.0.1:{port}",
            "AWS_HTTPS": "NO",
            "AWS_VIRTUAL_HOSTING": "FALSE",
            "CPL_AWS_AUTODETECT_EC2": "NO",
        }
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the session's S3 server; returns its name."""
    import uuid

    import boto3

    name = f"geoseg-test-{uuid.uuid4().hex[:12]}"
    boto3.session.Session().client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def stac_api_server():
    """A real STAC API (stac-fastapi-pgstac over pgstac in PostgreSQL 15 + PostGIS) on 127.0.0.1 for
    the session (``helpers.pgstac``); skips, saying what is missing, where it cannot run."""
    from helpers.pgstac import PgstacServer, missing

    reason = missing()
    if reason is not None:
        pytest.skip(reason)
    server = PgstacServer().start()
    try:
        yield server
    finally:
        server.stop()
