"""Blended windows: the grid maths, and a real deep network (ukis-csmask's cloud U-Net) on real
Sentinel-2 scenes, where tile seams used to show (the issue that brought blending in).

The cloud network's squeeze-and-excitation blocks pool over the whole window, so a tile cut without
blending answers differently at its edges than its neighbour: whole tiles flipped between clear
and cloud on Cartagena's hazy sea. The context-free exactness of blending is tested in
test_invariance.py (the oracle models at nine tilings, blended by default).
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.windows import Window

from geoseg.config import config_from_dict, load_config
from geoseg.pipeline import run
from geoseg.seams import seam_index
from geoseg.windows import BlendPlan, head_windows, resample_scale

REPO = Path(__file__).resolve().parents[1]
CLOUDS = REPO / "configs" / "sentinel2-clouds.yaml"


# -- the grid, without any model


@pytest.mark.parametrize("extent, window, overlap", [(1000, 256, 64), (4096, 512, 128), (700, 512, 256), (300, 512, 128)])
def test_windows_cover_every_pixel_and_fades_add_up_to_one(extent, window, overlap):
    hw = head_windows(window, overlap, 1.0, extent, extent)
    total = np.zeros(extent)
    for start in hw.starts(extent):
        ramp = hw.ramp()
        lo, hi = max(start, 0), min(start + hw.side, extent)
        total[lo:hi] += ramp[lo - start : hi - start]
    assert (total > 0).all()  # every pixel has a window that counts
    inner = slice(hw.overlap, extent - hw.overlap)  # away from the raster's edges: a partition of unity
    np.testing.assert_allclose(total[inner], 1.0, atol=1e-6)
    if extent <= window:  # a small raster: one window just big enough, a multiple of 32
        assert hw.starts(extent) == [-((hw.side - extent) // 2)] and hw.side == -(-extent // 32) * 32


def test_context_holds_every_window_over_a_read_window():
    plan = BlendPlan("k", 3000, 2000, {"a": head_windows(512, 128, 1.0, 3000, 2000),
                                        "b": head_windows(256, 64, 3.0, 3000, 2000)})
    read = Window(1000, 600, 576, 576)
    ctx = plan.context(read)
    for name, hw in plan.heads.items():
        wins = plan.windows(name, read)
        assert wins
        for r, c in wins:  # each window overlaps the read window; its part inside the raster is read
            assert r < 600 + 576 and r + hw.side > 600 and c < 1000 + 576 and c + hw.side > 1000
            assert ctx.row_off <= max(r, 0) and ctx.col_off <= max(c, 0)
            assert ctx.row_off + ctx.height >= min(r + hw.side, 2000) and ctx.col_off + ctx.width >= min(c + hw.side, 3000)


def test_resampling_only_beyond_a_quarter_off():
    assert resample_scale(10, 9.81) == 1.0 and resample_scale(None, 10) == 1.0
    assert resample_scale(30, 10) == pytest.approx(3.0) and resample_scale(1, 10) == pytest.approx(0.1)
    hw = head_windows(256, 128, 3.0, 747, 1226)
    assert (hw.model_side, hw.side, hw.stride) == (256, 768, 384) and hw.resampled


# -- a real network on real Sentinel-2


@pytest.fixture(scope="module")
def stacks(shared_data, tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("ukis_csmask")
    from tests.helpers.sentinel2 import stack

    d = tmp_path_factory.mktemp("s2")
    out = {}
    for city in ("cartagena", "honolulu", "casablanca"):
        out[f"{city}_10m"] = stack(shared_data, city, d / f"{city}_10m.tif")
        out[f"{city}_30m"] = stack(shared_data, city, d / f"{city}_30m.tif", factor=3)
    return out


def _mask(out: Path, stem: str) -> tuple[np.ndarray, dict]:
    with rasterio.open(out / stem / f"{stem}_clouds.tif") as ds:
        return ds.read(1), {"crs": ds.crs, "transform": ds.transform, "shape": ds.shape}


def test_cloud_network_leaves_no_seams_and_does_not_depend_on_the_tiling(ray_session, stacks, tmp_path):
    """Cartagena at 10 m through configs/sentinel2-clouds.yaml (read averaged to the network's 30 m):
    the masks of two tilings are identical, lie on the input's grid, show neither the tile grid nor
    the window grid, and agree with one pass of the network over the whole scene (one window holds
    it) better than tiles without blending do; those show their tiles."""
    src = stacks["cartagena_10m"]
    masks = {}
    for tiling in ({}, {"tile_size": 256}, {"tile_size": 256, "blend": "none"}, {"window": 416}):
        name = "_".join(f"{k}{v}" for k, v in tiling.items()) or "default"
        out = tmp_path / name
        data = yaml.safe_load(CLOUDS.read_text())
        data["tiling"].update(tiling)
        if tiling.get("blend") == "none":  # tiles run as they are: at 10 m, the contract said so by hand
            data["models"]["clouds"]["input"]["gsd_m"] = 10
        report = run([str(src)], out, config_from_dict(data, str(CLOUDS), str(CLOUDS.parent)), progress=False)
        assert report.ok, report.failures
        masks[name], grid = _mask(out, "cartagena_10m")
        if "blendnone" not in name:
            with rasterio.open(src) as ds:
                assert grid == {"crs": ds.crs, "transform": ds.transform, "shape": ds.shape}
    default, tiled, cut = masks["default"], masks["tile_size256"], masks["tile_size256_blendnone"]
    one_pass = masks["window416"]  # 1226 px at 10 m = 401 px at 30 m: one window of 416 covers it
    np.testing.assert_array_equal(default, tiled)  # the blend belongs to the scene, not to the tiles
    config = load_config(CLOUDS)
    stride = round((config.tiling.window - config.tiling.overlap) * 3)  # window grid lines, input pixels
    seams = {"tiles 256": seam_index(tiled, 256, 255), f"tiles {config.tiling.tile_size}":
             seam_index(default, config.tiling.tile_size, 255), f"windows {stride}": seam_index(default, stride, 255),
             "tiles 256, blend none": seam_index(cut, 256, 255)}
    agree = {"blended": float(np.mean(default == one_pass)), "tiles, blend none": float(np.mean(cut == one_pass))}
    print("Cartagena seam index:", {k: round(v, 2) for k, v in seams.items()},
          f"(one pass: {seam_index(one_pass, 256, 255):.2f} at 256); cloud {np.mean(default == 1):.1%} blended,",
          f"{np.mean(cut == 1):.1%} unblended, {np.mean(one_pass == 1):.1%} one pass; agreement with one pass:",
          {k: f"{v:.2%}" for k, v in agree.items()})
    assert agree["blended"] >= 0.93 and agree["blended"] > agree["tiles, blend none"]
    assert seams["tiles 256"] <= 2 and seams[f"tiles {config.tiling.tile_size}"] <= 2 and seams[f"windows {stride}"] <= 2
    assert seams["tiles 256, blend none"] > 5  # the index sees seams where there are some


@pytest.mark.parametrize("city, agree", [("cartagena", 0.90), ("honolulu", 0.99), ("casablanca", 0.99)])
def test_cloud_masks_agree_with_ukis_csmask(ray_session, stacks, tmp_path, city, agree):
    """On 30 m stacks the masks agree with ukis-csmask's own CSmask (onnxruntime, its own tiling
    and blending) on the same bands as reflectance."""
    pytest.importorskip("onnxruntime")
    from ukis_csmask.mask import CSmask

    src = stacks[f"{city}_30m"]
    report = run([str(src)], tmp_path, load_config(CLOUDS), progress=False)
    assert report.ok, report.failures
    ours, _ = _mask(tmp_path, src.stem)
    with rasterio.open(src) as ds:
        image = np.moveaxis(ds.read().astype(np.float32) / 10000.0, 0, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # images smaller than its 256 px windows: it says so
        reference = CSmask(image, band_order=["blue", "green", "red", "nir"], product_level="l2a").csm[..., 0]
    share = float(np.mean(ours == reference))
    print(f"{city} 30 m: agreement with CSmask {share:.2%}; cloud {np.mean(ours == 1):.1%} (CSmask "
          f"{np.mean(reference == 1):.1%}), shadow {np.mean(ours == 2):.1%} ({np.mean(reference == 2):.1%})")
    assert share >= agree
    # Cloud cover, measured: summary.json, summary.csv and the STAC Item say what the mask holds.
    summary = json.loads((tmp_path / src.stem / "summary.json").read_text())
    cloud, shadow = 100 * np.mean(ours == 1), 100 * np.mean(ours == 2)
    assert summary["cloud_model"] == "clouds"
    assert summary["cloud_cover"] == pytest.approx(cloud, abs=1e-3)
    assert summary["cloud_shadow_cover"] == pytest.approx(shadow, abs=1e-3)
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert {float(r["cloud_cover"]) for r in rows} == {summary["cloud_cover"]}
    item = json.loads((tmp_path / src.stem / f"{src.stem}.stac.json").read_text())
    assert item["properties"]["eo:cloud_cover"] == pytest.approx(cloud, abs=1e-3)
    assert any("/eo/" in ext for ext in item["stac_extensions"])


def test_absurd_resampling_is_refused_with_the_limit_to_raise(ray_session, shared_data, tmp_path):
    """The default land-use model works at 1 m; rasterio's RGB.byte.tif has 300 m pixels."""
    src = shared_data / "rasterio" / "RGB.byte.tif"
    report = run([str(src)], tmp_path, load_config(REPO / "configs" / "default.yaml"), progress=False)
    assert not report.ok
    (path, error), = report.failures
    assert path == str(src) and "\n" not in error
    # 299.87 m on the ground at the scene's centre: 89,922 model pixels of 1 m from each of its pixels.
    assert re.search(r"RGB\.byte\.tif: does not fit model 'landuse': was trained at 1 m per pixel, the raster has "
                     r"300 m: resampling would make 89,9\d\d model pixels of each of its pixels \(limit 16x per "
                     r"axis\); resample the raster, or raise tiling.max_resample", error), error
    assert not (tmp_path / "RGB.byte").exists()
