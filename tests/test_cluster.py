"""Scale-out on a real multi-node Ray cluster (three nodes on this machine): scenes are assembled by
writers on more than one node, and every output equals a single-node run's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.outputs import assert_same_scene

from geoseg.core.config import load_config
from geoseg.runner.pipeline import run

HELPER = Path(__file__).parent / "helpers" / "cluster_run.py"


@pytest.fixture(scope="module")
def three_scenes(tmp_path_factory):
    from geoseg.train.synth import write_scene

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
    proc = subprocess.run(
        [
            sys.executable,
            str(HELPER),
            str(oracle_config_path),
            json.dumps(overrides),
            str(multi),
            str(report_json),
            *inputs,
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cluster = json.loads(report_json.read_text())
    assert cluster["ok"], cluster["failures"]
    assert len(cluster["nodes"]) == 3
    assert len(set(cluster["writer_nodes"].values())) >= 2, cluster["writer_nodes"]  # assembled on several nodes

    tasks = {name: spec.task for name, spec in config.models.items()}
    for path in inputs:
        stem = path.rsplit("/", 1)[1][:-4]
        features = assert_same_scene(single / stem, multi / stem, stem, tasks)
        assert features["buildings"] > 0 and features["ships"] > 0
