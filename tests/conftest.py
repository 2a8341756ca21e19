"""Shared fixtures: one local Ray per test session, real data paths, synthetic scenes."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]


def pytest_report_header(config: pytest.Config) -> list[str]:
    import rasterio
    import ray
    import torch

    return [
        f"geoseg stack: GDAL {rasterio.__gdal_version__}, rasterio {rasterio.__version__}, torch {torch.__version__} "
        f"(CUDA {'yes' if torch.cuda.is_available() else 'no'}), Ray {ray.__version__}, Python {platform.python_version()}"
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
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, object_store_memory=300 * 1024**2,
                 log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def oracle_config_path() -> Path:
    return REPO / "configs" / "synthetic-oracle.yaml"


@pytest.fixture(scope="session")
def synth_scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1536 x 1536 synthetic scene (objects on seams, corners, longer than a 1024 tile, nodata corner)."""
    from geoseg.synth import write_scene

    d = tmp_path_factory.mktemp("synth")
    path = d / "scene.tif"
    write_scene(path, size=1536, seed=3)
    return path
