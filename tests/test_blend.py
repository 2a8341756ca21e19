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

from geoseg.core.config import config_from_dict, load_config
from geoseg.raster.windows import BlendPlan, head_windows, resample_scale
from geoseg.runner.pipeline import run
from geoseg.train.seams import seam_index

REPO = Path(__file__).resolve().parents[1]
CLOUDS = REPO / "configs" / "sentinel2-clouds.yaml"


# -- the grid, without any model


@pytest.mark.parametrize(
    "extent, window, overlap", [(1000, 256, 64), (4096, 512, 128), (700, 512, 256), (300, 512, 128)]
)
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
    plan = BlendPlan(
        "k", 3000, 2000, {"a": head_windows(512, 128, 1.0, 3000, 2000), "b": head_windows(256, 64, 3.0, 3000, 2000)}
    )
    read = Window(1000, 600, 576, 576)
    ctx = plan.context(read)
    for name, hw in plan.heads.items():
        wins = plan.windows(name, read)
        assert wins
        for r, c in wins:  # each window overlaps the read window; its part inside the raster is read
            assert r < 600 + 576 and r + hw.side > 600 and c < 1000 + 576 and c + hw.side > 1000
            assert ctx.row_off <= max(r, 0) and ctx.col_off <= max(c, 0)
            assert ctx.row_off + ctx.height >= min(r + hw.side, 2000) and ctx.col_off + ctx.width >= min(
                c + hw.side, 3000
            )


def test_resampling_only_beyond_a_quarter_off():
    assert resample_scale(10, 9.81) == 1.0 and resample_scale(None, 10) == 1.0
    assert resample_scale(30, 10) == pytest.approx(3.0) and resample_scale(1, 10) == pytest.approx(0.1)
    hw = head_windows(256, 128, 3.0, 747, 1226)
    assert (hw.model_side, hw.side, hw.stride) == (256, 768, 384) and hw.resampled


@pytest.mark.parametrize("top, left, bottom, right", [(6, 2, 18, 22), (0, 0, 12, 20), (2, 7, 20, 30), (5, 6, 9, 10)])
def test_tile_context_is_cut_where_the_read_window_reaches_further_and_reflected_where_it_falls_short(
    top, left, bottom, right
):
    """A tile is read with the context of its widest head, so one head's windows may need less than was
    read on some sides and more on others: the context is the read pixels cut to the windows' rows
    and columns, reflected (about the read window's edge) where they fall short."""
    from geoseg.models.blend import _padded

    have = Window(5, 4, 20, 12)  # columns 5-24, rows 4-15 of the raster were read
    read = np.random.default_rng(0).integers(0, 255, (3, 12, 20)).astype(np.uint8)
    # Reference: the read pixels reflected out far enough, then the asked rows and columns taken
    grow = ((0, 0), (max(4 - top, 0), max(bottom - 16, 0)), (max(5 - left, 0), max(right - 25, 0)))
    big = np.pad(read, grow, mode="reflect")
    r0, c0 = 4 - grow[1][0], 5 - grow[2][0]
    expected = big[:, top - r0 : bottom - r0, left - c0 : right - c0]
    got = _padded(read, have, top, left, bottom, right)
    assert got.shape == (3, bottom - top, right - left)
    np.testing.assert_array_equal(got, expected)


def test_aerial_config_runs_both_heads_on_drone_imagery_at_its_pixel_size(ray_session, shared_data, tmp_path):
    """configs/aerial.yaml as users run it (tiles of 512, both heads) on 0.3 m drone imagery: the land-use
    head reads 8x coarser pixels and so 8x the context of the buildings head; every tile used to fail
    (the buildings windows needed less than the tile had read). Both masks lie on the input's grid."""
    from rasterio.enums import Resampling

    src, crop = shared_data / "hotosm_buildings" / "nairobi.tif", tmp_path / "nairobi_0.3m.tif"
    with rasterio.open(src) as ds:
        window = Window(14336, 0, 4096, 4096)  # 1024 x 1024 at 0.3 m: the demo's crop, with buildings
        profile = ds.profile | {
            "width": 1024,
            "height": 1024,
            "transform": ds.window_transform(window) * ds.window_transform(window).scale(4, 4),
            "tiled": True,
            "blockxsize": 256,
            "blockysize": 256,
            "compress": "deflate",
            "photometric": "rgb",
        }
        data = ds.read(window=window, out_shape=(ds.count, 1024, 1024), resampling=Resampling.average)
    with rasterio.open(crop, "w", **profile) as out:
        out.write(data)
    report = run([str(crop)], tmp_path / "out", load_config(REPO / "configs" / "aerial.yaml"), progress=False)
    assert report.ok, report.failures
    out = tmp_path / "out" / crop.stem
    for head in ("landuse", "buildings"):
        with rasterio.open(out / f"{crop.stem}_{head}.tif") as ds:
            assert (ds.shape, ds.transform) == ((1024, 1024), profile["transform"])
    summary = json.loads((out / "summary.json").read_text())["models"]
    assert summary["buildings"]["classes"]["building"]["count"] >= 1


# -- a real network on real Sentinel-2


@pytest.fixture(scope="module")
def stacks(shared_data, tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("ukis_csmask")
    from helpers.sentinel2 import stack

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
    seams = {
        "tiles 256": seam_index(tiled, 256, 255),
        f"tiles {config.tiling.tile_size}": seam_index(default, config.tiling.tile_size, 255),
        f"windows {stride}": seam_index(default, stride, 255),
        "tiles 256, blend none": seam_index(cut, 256, 255),
    }
    agree = {"blended": float(np.mean(default == one_pass)), "tiles, blend none": float(np.mean(cut == one_pass))}
    print(
        "Cartagena seam index:",
        {k: round(v, 2) for k, v in seams.items()},
        f"(one pass: {seam_index(one_pass, 256, 255):.2f} at 256); cloud {np.mean(default == 1):.1%} blended,",
        f"{np.mean(cut == 1):.1%} unblended, {np.mean(one_pass == 1):.1%} one pass; agreement with one pass:",
        {k: f"{v:.2%}" for k, v in agree.items()},
    )
    assert agree["blended"] >= 0.93 and agree["blended"] > agree["tiles, blend none"]
    assert (
        seams["tiles 256"] <= 2 and seams[f"tiles {config.tiling.tile_size}"] <= 2 and seams[f"windows {stride}"] <= 2
    )
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
    print(
        f"{city} 30 m: agreement with CSmask {share:.2%}; cloud {np.mean(ours == 1):.1%} (CSmask "
        f"{np.mean(reference == 1):.1%}), shadow {np.mean(ours == 2):.1%} ({np.mean(reference == 2):.1%})"
    )
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
    """The synthetic land-use model works at 1 m; rasterio's RGB.byte.tif has 300 m pixels."""
    src = shared_data / "rasterio" / "RGB.byte.tif"
    report = run([str(src)], tmp_path, load_config(REPO / "configs" / "synthetic.yaml"), progress=False)
    assert not report.ok
    ((path, error),) = report.failures
    assert path == str(src) and "\n" not in error
    # 299.87 m on the ground at the scene's centre: 89,922 model pixels of 1 m from each of its pixels.
    assert re.search(
        r"RGB\.byte\.tif: does not fit model 'landuse': was trained at 1 m per pixel, the raster has "
        r"300 m: resampling would make 89,9\d\d model pixels of each of its pixels \(limit 16x per "
        r"axis\); resample the raster, or raise tiling.max_resample",
        error,
    ), error
    assert not (tmp_path / "RGB.byte").exists()


def _upsampled(src: Path, dst: Path, factor: int) -> Path:
    """``src`` with every pixel repeated ``factor`` x ``factor`` times: the same ground, finer pixels."""
    with rasterio.open(src) as ds:
        profile, data = ds.profile, ds.read()
        profile.update(
            width=ds.width * factor,
            height=ds.height * factor,
            transform=ds.transform * ds.transform.scale(1 / factor, 1 / factor),
        )
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data.repeat(factor, axis=1).repeat(factor, axis=2))
    return dst


def test_finer_raster_is_resampled_to_the_models_pixels_and_written_on_its_own(
    ray_session, oracle_config_path, tmp_path
):
    """The context-free oracles, told they work at 1 m, on a synthetic 1 m scene upsampled to 0.5 m:
    each window is averaged back to 1 m (2 x 2 equal pixels: the original values), and the outputs,
    on the 0.5 m grid, equal the truth upsampled: land use pixel for pixel, every object once."""
    import geopandas as gpd

    from geoseg.train.synth import write_scene

    scene = tmp_path / "one_m.tif"
    write_scene(scene, size=384, seed=11)
    fine = _upsampled(scene, tmp_path / "half_m.tif", 2)
    data = yaml.safe_load(oracle_config_path.read_text())
    for head in data["models"].values():
        head["input"] = {"gsd_m": 1.0}
    data["tiling"] = {"tile_size": 256, "halo": 16, "window": 128, "overlap": 32}  # several windows, resampled
    config = config_from_dict(data, str(oracle_config_path), str(oracle_config_path.parent))
    report = run([str(fine)], tmp_path / "out", config, progress=False)
    assert report.ok, report.failures
    out = tmp_path / "out" / "half_m"
    truth_dir = scene.with_suffix(".truth")
    with (
        rasterio.open(out / "half_m_landuse.tif") as got,
        rasterio.open(truth_dir / "landuse.tif") as want,
        rasterio.open(fine) as grid,
    ):
        assert (got.transform, got.shape) == (grid.transform, grid.shape)
        expected = want.read(1).repeat(2, axis=0).repeat(2, axis=1)
        np.testing.assert_array_equal(got.read(1), expected)
    summary = json.loads((out / "summary.json").read_text())
    for name in ("buildings", "ships"):
        truth = gpd.read_file(truth_dir / "objects.gpkg", layer=name)
        found = gpd.read_file(out / "half_m.gpkg", layer=name)
        assert len(found) == len(truth) == summary["models"][name]["classes"][name[:-1]]["count"], name
        # The same ground: areas in m^2 agree with the truth's to within the pixel edges' rounding.
        assert found.area.sum() == pytest.approx(truth.to_crs(found.crs).area.sum(), rel=0.02), name


def test_landsat_cloud_config_runs_on_a_six_band_stack(ray_session, tmp_path):
    """configs/landsat-clouds.yaml on a made-up Landsat 8 Collection 2 Level-2 stack at 30 m (no
    real Landsat scene with SWIR bands is at hand): dark vegetated land with a bright, flat block in
    its middle. The 6-band network builds, reads six bands as reflectance and agrees with
    ukis-csmask's own CSmask on the same reflectance. (Neither calls all of a flat, textureless
    block cloud: it is not much like a cloud.)"""
    pytest.importorskip("ukis_csmask")
    pytest.importorskip("onnxruntime")
    from ukis_csmask.mask import CSmask

    rng = np.random.default_rng(0)
    land = np.array([0.04, 0.07, 0.05, 0.30, 0.18, 0.09])  # blue .. swir22 reflectance of vegetation
    cloud = np.array([0.75, 0.74, 0.74, 0.72, 0.45, 0.35])
    reflectance = land[:, None, None] + rng.normal(0, 0.01, (6, 300, 300))
    reflectance[:, 100:200, 100:200] = cloud[:, None, None] + rng.normal(0, 0.01, (6, 100, 100))
    dn = np.clip((reflectance + 0.2) / 0.0000275, 1, 65535).astype(np.uint16)
    src = tmp_path / "landsat.tif"
    with rasterio.open(
        src,
        "w",
        driver="GTiff",
        width=300,
        height=300,
        count=6,
        dtype="uint16",
        crs="EPSG:32617",
        transform=rasterio.Affine(30, 0, 600000, 0, -30, 4000000),
    ) as ds:
        ds.write(dn)
    report = run([str(src)], tmp_path / "out", load_config(REPO / "configs" / "landsat-clouds.yaml"), progress=False)
    assert report.ok, report.failures
    mask, _ = _mask(tmp_path / "out", "landsat")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = CSmask(
            np.moveaxis(dn * 0.0000275 - 0.2, 0, -1).astype(np.float32),
            band_order=["blue", "green", "red", "nir", "swir16", "swir22"],
            product_level="l2a",
        ).csm[..., 0]
    outside = np.ones_like(mask, bool)
    outside[80:220, 80:220] = False
    share = float(np.mean(mask == reference))
    print(
        f"landsat stack: agreement with CSmask {share:.1%}; land clear {np.mean(mask[outside] == 0):.1%} "
        f"(CSmask {np.mean(reference[outside] == 0):.1%}); block cloud {np.mean(mask[100:200, 100:200] == 1):.1%} "
        f"(CSmask {np.mean(reference[100:200, 100:200] == 1):.1%})"
    )
    assert set(np.unique(mask)) <= {0, 1, 2} and share >= 0.9 and np.mean(mask[outside] == 0) > 0.95


@pytest.mark.parametrize("variant", ["4b_l2a", "4b_l1c", "6b_l2a", "6b_l1c"])
def test_cloud_networks_equal_ukis_csmasks_onnx_files(variant):
    """geoseg.models.csmask's smp U-Net, filled from the wheel's ONNX file, answers as onnxruntime running
    that file does, on one 256 px window of reflectance-like input (the same normalised values)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    import torch

    from geoseg.models.csmask import build, model_info, package_file

    stats = model_info(variant)["data"]["dataset_statistics"]["img"]
    bands = len(stats[0])
    rng = np.random.default_rng(1)
    reflectance = rng.uniform(0.0, 0.6, (bands, 256, 256)).astype(np.float32)
    reflectance[:, 64:192, 64:192] += 0.4  # something bright among the noise
    x = ((reflectance - np.array(stats[0], np.float32)[:, None, None]) / np.array(stats[1], np.float32)[:, None, None])[
        None
    ]
    with torch.no_grad():
        ours = build(variant)(torch.from_numpy(x)).numpy()
    session = onnxruntime.InferenceSession(
        str(package_file(f"model_{variant}.onnx")), providers=["CPUExecutionProvider"]
    )
    theirs = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert np.mean(ours.argmax(1) == theirs.argmax(1)) >= 0.99  # noise makes near-ties: float order decides those
    assert float(np.median(np.abs(ours - theirs))) < 0.01 * float(np.abs(theirs).max())


def test_rgb_start_from_the_cloud_network_answers_as_it_does_without_nir():
    """``sentinel2_l2a_rgb`` (red, green, blue) is the 4-band network with its first layer cut to
    those bands: on the same pixels it answers as the 4-band one given blue, green, red and a NIR
    of zero."""
    pytest.importorskip("ukis_csmask")
    import torch

    from geoseg.models.csmask import build, sentinel2_l2a_rgb

    rgb = torch.from_numpy(np.random.default_rng(2).normal(0, 1, (1, 3, 96, 96)).astype(np.float32))
    four = torch.cat([rgb[:, [2, 1, 0]], torch.zeros_like(rgb[:, :1])], 1)  # blue, green, red, nir = 0
    with torch.no_grad():
        assert torch.allclose(sentinel2_l2a_rgb()(rgb), build("4b_l2a")(four), atol=1e-4)


def test_window_cache_stays_bounded_and_forgets_rows_above():
    import torch

    from geoseg.models.blend import WindowCache

    cache = WindowCache(max_bytes=10 * 1024)
    for c in range(0, 4096, 256):  # 16 windows of 1 KiB: the oldest 6 go
        cache.put(("scene", "m", 0, c), torch.zeros(1024, dtype=torch.uint8), side=512)
    assert cache.bytes == 10 * 1024 and len(cache.items) == 10 and cache.get(("scene", "m", 0, 0)) is None
    cache.put(("scene", "m", 384, 0), torch.zeros(1024, dtype=torch.uint8), side=512)
    cache.put(("other", "m", 0, 0), torch.zeros(1024, dtype=torch.uint8), side=512)
    cache.drop_above("scene", 512)  # windows of row 0 end at 512: no tile from row 512 on needs them
    assert set(cache.items) == {("scene", "m", 384, 0), ("other", "m", 0, 0)} and cache.bytes == 2048


def test_trained_networks_give_the_same_objects_at_any_tiling(ray_session, tmp_path):
    """The synthetic config's trained U-Nets (not context-free) on a synthetic scene at two tilings:
    land use byte-equal, the same objects (same polygons, ids up to renumbering), the same counts."""
    from helpers.outputs import same_instances, wkb_set

    from geoseg.train.synth import write_scene

    scene = tmp_path / "scene.tif"
    write_scene(scene, size=700, seed=12)
    config = REPO / "configs" / "synthetic.yaml"
    for tiling in ({"tile_size": 1024}, {"tile_size": 192, "halo": 8}):
        report = run(
            [str(scene)],
            tmp_path / f"out{tiling['tile_size']}",
            load_config(config, {"tiling": tiling}),
            progress=False,
        )
        assert report.ok, report.failures
    a, b = tmp_path / "out1024" / "scene", tmp_path / "out192" / "scene"
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["models"] == sb["models"] and (sa["tiles"], sb["tiles"]) == (1, 16)  # counts, pixels, areas
    for head in ("landuse", "buildings", "ships"):
        with rasterio.open(a / f"scene_{head}.tif") as x, rasterio.open(b / f"scene_{head}.tif") as y:
            xa, ya = x.read(1), y.read(1)
        assert (xa == ya).all() if head == "landuse" else same_instances(xa, ya), head
        assert wkb_set(a / "scene.gpkg", head) == wkb_set(b / "scene.gpkg", head), head
    counts = {h: sa["models"][h]["classes"][h[:-1]]["count"] for h in ("buildings", "ships")}
    assert counts["buildings"] > 5 and counts["ships"] > 5, counts  # objects there were, some on tile seams


def test_held_out_scoring_blends_as_the_run_does(ray_session, tmp_path):
    """``geoseg train``'s held-out scoring (``blend_image`` over an in-memory scene) gives the land
    use that ``geoseg run`` writes for the same scene and window grid: the scores it records are
    the run path's."""
    from geoseg.models.blend import blend_image
    from geoseg.train.model_dir import load_trained
    from geoseg.train.synth import write_scene

    scene = tmp_path / "scene.tif"
    write_scene(scene, size=700, seed=5)
    window, overlap = 256, 64
    config = load_config(
        REPO / "configs" / "synthetic.yaml",
        {"tiling": {"tile_size": 320, "window": window, "overlap": overlap}, "runtime": {"precision": "fp32"}},
    )
    config = config.model_copy(update={"models": {"landuse": config.models["landuse"]}})
    report = run([str(scene)], tmp_path / "out", config, progress=False)
    assert report.ok, report.failures
    with rasterio.open(tmp_path / "out" / "scene" / "scene_landuse.tif") as ds:
        written = ds.read(1)
    spec, model = load_trained(REPO / "models" / "synth-landuse")
    with rasterio.open(scene) as ds:
        image, valid = ds.read(spec.bands), ds.dataset_mask() > 0
    probs = blend_image(model, spec, image, valid, head_windows(window, overlap, 1.0, 700, 700))
    agree = float((probs.argmax(0) == written)[valid].mean())
    assert agree >= 0.9999, agree  # (float sums in another order may flip a tie)


def test_window_cache_is_safe_for_an_actors_two_calls():
    """A GPU actor runs two calls at once on one cache: lookups, stores and row drops from two
    threads never fail, and the bytes it counts stay those of what it holds."""
    import threading

    import torch

    from geoseg.models.blend import WindowCache

    cache = WindowCache(max_bytes=64 * 1024)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(4000):
                key = ("scene", "head", (i * 7 + seed) % 50 * 8, 0)
                if cache.get(key) is None:
                    cache.put(key, torch.zeros(16, 16, dtype=torch.uint8), side=8)
                if i % 5 == seed:
                    cache.drop_above("scene", (i * 3) % 400)
        except BaseException as exc:  # noqa: BLE001 (any failure in a thread is the test's)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert cache.bytes == sum(v.numel() * v.element_size() for v in cache.items.values())
