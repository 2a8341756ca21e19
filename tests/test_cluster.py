"""Scale-out on a real multi-node Ray cluster (three nodes on this machine): scenes are assembled by
writers on more than one node, and every output equals a single-node run's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio

from geoseg.config import load_config
from geoseg.pipeline import run

HELPER = Path(__file__).parent / "helpers" / "cluster_run.py"


def _same_instances(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renumbering: the same pixels are objects and the id map is one-to-one."""
    if not ((a > 0) == (b > 0)).all():
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


@pytest.fixture(scope="module")
def three_scenes(tmp_path_factory):
    from geoseg.synth import write_scene

    d = tmp_path_factory.mktemp("cluster-scenes")
    for seed, size in ((11, 640), (12, 700), (13, 600)):
        write_scene(d / f"scene{seed}.tif", size=size, seed=seed)
    return d


def test_multi_node_cluster_equals_single_node(ray_session, three_scenes, oracle_config_path, tmp_path):
    inputs = sorted(str(p) for p in three_scenes.glob("*.tif"))
    single = tmp_path / "single"
    overrides = {"tiling": {"tile_size": 256, "halo": 32}, "runtime": {"batch_size": 2}}
    config = load_config(oracle_config_path, overrides)
    report = run(inputs, single, config, progress=False)
    assert report.ok, report.failures

    multi, report_json = tmp_path / "multi", tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(HELPER), str(oracle_config_path),
                           json.dumps(overrides), str(multi),
                           str(report_json), *inputs], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cluster = json.loads(report_json.read_text())
    assert cluster["ok"], cluster["failures"]
    assert len(cluster["nodes"]) == 3
    assert len(set(cluster["writer_nodes"].values())) >= 2, cluster["writer_nodes"]  # assembled on several nodes

    for path in inputs:
        stem = path.rsplit("/", 1)[1][:-4]
        a, b = single / stem, multi / stem
        assert json.loads((a / "summary.json").read_text())["models"] == json.loads((b / "summary.json").read_text())["models"]
        with rasterio.open(a / f"{stem}_landuse.tif") as x, rasterio.open(b / f"{stem}_landuse.tif") as y:
            assert (x.read(1) == y.read(1)).all() and x.transform == y.transform and x.crs == y.crs
        for head in ("buildings", "ships"):
            with rasterio.open(a / f"{stem}_{head}.tif") as x, rasterio.open(b / f"{stem}_{head}.tif") as y:
                assert _same_instances(x.read(1), y.read(1))
            ga = gpd.read_file(a / f"{stem}.gpkg", layer=head).sort_values("area_m2", kind="stable")
            gb = gpd.read_file(b / f"{stem}.gpkg", layer=head).sort_values("area_m2", kind="stable")
            assert len(ga) == len(gb) > 0
            assert sorted(g.normalize().wkb for g in ga.geometry) == sorted(g.normalize().wkb for g in gb.geometry)
        la = gpd.read_file(a / f"{stem}.gpkg", layer="landuse")
        lb = gpd.read_file(b / f"{stem}.gpkg", layer="landuse")
        assert sorted(g.normalize().wkb for g in la.geometry) == sorted(g.normalize().wkb for g in lb.geometry)
