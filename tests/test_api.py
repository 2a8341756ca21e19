"""The Python API: ``geoseg.run`` and ``geoseg.open_run`` (layers, counts, masks, failures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def test_import_geoseg_stays_light():
    """``import geoseg`` loads neither Ray nor torch nor GDAL; the API comes on first use."""
    code = (
        "import sys, geoseg; heavy = [m for m in ('ray', 'torch', 'rasterio', 'geopandas') if m in sys.modules]; "
        "assert not heavy, heavy; assert callable(geoseg.run) and callable(geoseg.open_run); print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_config_arguments_and_overrides(oracle_config_path):
    """A path, a mapping or a Config, with tiling/runtime keywords; an unknown keyword is an error."""
    import yaml

    from geoseg.api import resolve_config, with_overrides
    from geoseg.core.errors import ConfigError

    from_path = resolve_config(oracle_config_path)
    from_dict = resolve_config(yaml.safe_load(oracle_config_path.read_text()))
    assert from_dict.models == from_path.models and resolve_config(from_path) is from_path
    assert resolve_config(None).models["buildings"].weights  # the packaged default config (aerial models)
    changed = with_overrides(from_path, {"tile_size": 256, "halo": 16, "batch_size": 2, "device": "cpu"})
    assert (changed.tiling.tile_size, changed.tiling.halo, changed.runtime.batch_size, changed.runtime.device) == (
        256,
        16,
        2,
        "cpu",
    )
    assert changed.models == from_path.models and from_path.tiling.tile_size == 512
    with pytest.raises(ConfigError, match="tile_sise.*not a setting of tiling, runtime"):
        with_overrides(from_path, {"tile_sise": 256})
    with pytest.raises(ConfigError, match="tiling.tile_size"):
        with_overrides(from_path, {"tile_size": 1})


@pytest.fixture(scope="module")
def api_run(ray_session, oracle_config_path, tmp_path_factory):
    """``geoseg.run`` on a synthetic scene (several tiles) and a file that is not a raster."""
    import geoseg
    from geoseg.train.synth import write_scene

    d = tmp_path_factory.mktemp("api")
    scene = d / "scenes" / "synth.tif"
    scene.parent.mkdir()
    write_scene(scene, size=512, seed=3)
    bad = d / "scenes" / "broken.tif"
    bad.write_text("not a raster\n")
    out = d / "out"
    report = geoseg.run([scene, bad], out, oracle_config_path, tile_size=256, halo=32, progress=False)
    return report, out, scene, bad


def test_run_returns_the_report(api_run):
    report, out, scene, bad = api_run
    assert [s["input"] for s in report.summaries] == [str(scene)]
    assert [p for p, _ in report.failures] == [str(bad)] and report.warnings == []
    assert (out / "synth" / "summary.json").is_file()


def test_open_run_counts_layers_and_masks(api_run):
    import geopandas
    import pandas
    import rasterio

    import geoseg

    report, out, scene, bad = api_run
    outputs = geoseg.open_run(out)
    assert outputs.scenes == ["synth"] and "1 scene(s), 1 failed" in repr(outputs)
    assert [p for p, _ in outputs.failures] == [str(bad)] and "not a readable raster" in outputs.failures[0][1]
    summary = json.loads((out / "synth" / "summary.json").read_text())
    assert outputs.summary("synth") == summary == outputs.summary(str(scene))  # by folder or by input path

    counts = outputs.counts
    assert list(counts.columns) == ["scene", "input", "model", "task", "class", "count", "pixels", "area_m2"]
    expected = [
        (model, cls, v.get("count"), v["pixels"], v["area_m2"])
        for model, m in summary["models"].items()
        for cls, v in m["classes"].items()
    ]
    got = [
        (
            r["model"],
            r["class"],
            None if pandas.isna(r["count"]) else int(r["count"]),
            int(r["pixels"]),
            float(r["area_m2"]),
        )
        for r in counts.to_dict("records")
    ]
    assert got == expected and set(counts.scene) == {"synth"} and set(counts.input) == {str(scene)}
    assert counts["count"].notna().sum() == 2 and counts["count"].sum() > 0  # buildings and ships

    layers = outputs.layers("synth")
    assert set(layers) == set(summary["models"]) and all(isinstance(g, geopandas.GeoDataFrame) for g in layers.values())
    for model, m in summary["models"].items():
        layer = layers[model]
        assert layer.crs is not None and layer.crs.equals(rasterio.open(scene).crs)
        for cls, v in m["classes"].items():
            rows = layer[layer["class"] == cls]
            if m["task"] == "instance":
                assert len(rows) == v["count"], (model, cls)
            else:  # one feature per region: the regions' areas add up to the class area
                assert rows["area_m2"].sum() == pytest.approx(v["area_m2"], rel=1e-6, abs=1e-3), (model, cls)
    assert len(outputs.layer("synth", "ships")) == summary["models"]["ships"]["classes"]["ship"]["count"]
    with pytest.raises(KeyError, match="no model 'cars'"):
        outputs.layer("synth", "cars")
    with pytest.raises(KeyError, match="no scene 'nope'.*synth"):
        outputs.masks("nope")

    masks = outputs.masks("synth")
    assert set(masks) == set(summary["models"]) and all(p.is_file() for p in masks.values())
    with rasterio.open(masks["ships"]) as ds:
        ids = ds.read(1)
    assert len(np.unique(ids[ids > 0])) == summary["models"]["ships"]["classes"]["ship"]["count"]


def test_open_run_without_manifest_reads_the_summaries(api_run, tmp_path):
    """A folder a killed run left without its manifest: the published scenes are still read."""
    import shutil

    import geoseg

    _, out, _, _ = api_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (copy / "run-manifest.json").unlink()
    outputs = geoseg.open_run(copy)
    assert outputs.scenes == ["synth"] and outputs.failures == []
    assert outputs.counts.equals(geoseg.open_run(out).counts)
