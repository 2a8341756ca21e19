"""The input contract (geoseg.json beside the weights): defaults for a head, YAML overrides, and
scene checks that fail one scene with one line naming the file, the model and what does not fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from affine import Affine
from click.testing import CliRunner

from geoseg.core.config import config_from_dict, load_config
from geoseg.core.contract import check_scene, save_contract, scene_gsd_m
from geoseg.core.errors import ConfigError, InputError
from geoseg.core.heads import ClipNormalize, ScaleNormalize
from geoseg.models.load import check_models, create_smp
from geoseg.raster.read import inspect_scene

CLASSES = ["water", "forest", "cropland", "urban", "bare"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny smp model with the contract of the synthetic land-use model (3-band uint8, 1 m)."""
    d = tmp_path_factory.mktemp("contract") / "landuse"
    create_smp("t", "Unet", "tu-resnet10t", 3, 5, {"encoder_depth": 3, "decoder_channels": [8, 8, 8]}).save_pretrained(
        str(d)
    )
    save_contract(
        d,
        {
            "task": "semantic",
            "classes": CLASSES,
            "bands": [1, 2, 3],
            "input": {"count": 3, "names": ["red", "green", "blue"], "dtype": "uint8", "gsd_m": 1.0},
            "normalize": {"scale": 255},
            "metrics": {"mean_iou": 0.9},
        },
    )
    return d


def _raster(
    path: Path, count: int = 3, dtype: str = "uint8", res: float = 1.0, size: int = 64, crs: str = "EPSG:32618"
) -> Path:
    rng = np.random.default_rng(0)
    data = rng.integers(1, 200, (count, size, size)).astype(dtype)
    x0, y0 = (-77.0, 38.9) if crs == "EPSG:4326" else (500000.0, 4300000.0)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=size,
        height=size,
        count=count,
        dtype=dtype,
        crs=crs,
        transform=Affine(res, 0, x0, 0, -res, y0),
        nodata=0,
    ) as ds:
        ds.write(data)
    return path


def _cfg(model_dir: Path, **head) -> object:
    return config_from_dict({"models": {"landuse": {"weights": str(model_dir), **head}}})


def test_contract_supplies_the_head_and_yaml_wins(model_dir):
    spec = _cfg(model_dir).models["landuse"]
    assert spec.task == "semantic" and spec.classes == CLASSES and spec.bands == [1, 2, 3]
    assert spec.normalize == ScaleNormalize(scale=255)
    assert spec.input.dtype == "uint8" and spec.input.count == 3 and spec.input.gsd_m == 1.0
    check_models(_cfg(model_dir))
    # An explicit band mapping turns the band-count check off; another normalisation the dtype check.
    spec = _cfg(model_dir, bands=[3, 2, 1], normalize={"clip_low": [0, 0, 0], "clip_high": [4000, 4000, 4000]}).models[
        "landuse"
    ]
    assert spec.bands == [3, 2, 1] and isinstance(spec.normalize, ClipNormalize)
    assert spec.input.count is None and spec.input.dtype is None and spec.input.gsd_m == 1.0
    # The YAML may also loosen a check directly.
    assert _cfg(model_dir, input={"gsd_tolerance": 20}).models["landuse"].input.gsd_tolerance == 20


def test_contract_test_time_augmentation_is_the_heads_default(tmp_path, model_dir):
    """A model scored with flips averaged (``tta: flip`` in its geoseg.json) runs with them, whatever
    ``runtime.tta`` says; the head's own ``tta`` in the YAML wins."""
    import json
    import shutil

    flipped = Path(shutil.copytree(model_dir, tmp_path / "flipped"))
    contract = json.loads((flipped / "geoseg.json").read_text())
    save_contract(flipped, {**{k: v for k, v in contract.items() if k != "geoseg_contract"}, "tta": "flip"})
    assert _cfg(model_dir).models["landuse"].tta is None  # no contract tta: runtime.tta applies
    assert _cfg(flipped).models["landuse"].tta == "flip"
    assert _cfg(flipped, tta="none").models["landuse"].tta == "none"


def test_relative_weights_resolve_against_the_yaml_folder(tmp_path, model_dir):
    import shutil

    shutil.copytree(model_dir, tmp_path / "models" / "lu")
    (tmp_path / "configs").mkdir()
    cfg_path = tmp_path / "configs" / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({"models": {"lu": {"weights": "../models/lu"}}}))
    assert load_config(cfg_path).models["lu"].classes == CLASSES
    cfg_path.write_text(yaml.safe_dump({"models": {"lu": {"weights": "models/lu"}}}))
    with pytest.raises(ConfigError, match=r"models.lu.weights: not found: .*configs/models/lu"):
        load_config(cfg_path)


@pytest.mark.parametrize(
    "raster,head,message",
    [
        ({"dtype": "uint16"}, {}, "does not fit model 'landuse': expects uint8 pixels, the raster is uint16"),
        (
            {"count": 4},
            {},
            "was trained on 3-band rasters (red, green, blue), this one has 4 band(s); set models.landuse.bands",
        ),
        ({"count": 1}, {"bands": [1, 1, 1], "input": {"count": 3}}, "was trained on 3-band rasters"),
        (
            {"res": 20.0},
            {},
            "was trained at 1 m per pixel, the raster has 20 m: resampling would make 400 model pixels "
            "of each of its pixels (limit 16x per axis); resample the raster, or raise tiling.max_resample",
        ),
        ({"count": 1}, {}, "reads bands [1, 2, 3] but the raster has 1 band(s)"),
    ],
)
def test_scene_that_does_not_fit_fails_with_one_line(tmp_path, model_dir, raster, head, message):
    path = _raster(tmp_path / "scene.tif", **raster)
    cfg = _cfg(model_dir, **head)
    info = inspect_scene(str(path))  # header only; the contract check adds the model's view
    with pytest.raises(InputError) as err:
        check_scene(info, cfg)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_pixel_size_is_resampled_within_the_limit_and_refused_without_resampling(tmp_path, model_dir):
    """A 10 m raster for a 1 m model: resampled (10x per axis, under the limit of 16); with
    resampling off, or blend none (tiles run as they are), refused as more than 3x off."""
    ten = inspect_scene(str(_raster(tmp_path / "ten.tif", res=10.0)))
    head = {"landuse": {"weights": str(model_dir)}}
    check_scene(ten, config_from_dict({"models": head}))
    for tiling, how in (
        ({"resample": False}, "turn tiling.resample on"),
        ({"blend": "none"}, "use tiling.blend: hann, which resamples"),
    ):
        with pytest.raises(InputError) as err:
            check_scene(ten, config_from_dict({"tiling": tiling, "models": head}))
        assert str(err.value) == (
            f"{ten.path}: does not fit model 'landuse': was trained at 1 m per pixel, the raster "
            f"has 10 m (more than 3x off); resample it, or {how}"
        )
    with pytest.raises(InputError, match="limit 8x per axis"):
        check_scene(ten, config_from_dict({"tiling": {"max_resample": 8}, "models": head}))


def test_fitting_scenes_pass_and_overrides_allow_others(tmp_path, model_dir):
    check_scene(inspect_scene(str(_raster(tmp_path / "ok.tif", res=1.5))), _cfg(model_dir))
    four = inspect_scene(str(_raster(tmp_path / "four.tif", count=4)))
    check_scene(four, _cfg(model_dir, bands=[1, 2, 3]))
    u16 = inspect_scene(str(_raster(tmp_path / "u16.tif", dtype="uint16")))
    check_scene(u16, _cfg(model_dir, normalize={"scale": 65535}))
    geo = inspect_scene(str(_raster(tmp_path / "geo.tif", res=1e-5, crs="EPSG:4326")))
    assert 0.8 < scene_gsd_m(geo.crs_wkt, geo.transform, geo.width, geo.height) < 1.2
    check_scene(geo, _cfg(model_dir))


def test_run_reports_the_misfit_scene_and_processes_the_others(ray_session, tmp_path, model_dir):
    from geoseg.cli.main import cli

    good = _raster(tmp_path / "in" / "good.tif") if (tmp_path / "in").mkdir() is None else None
    _raster(tmp_path / "in" / "wide.tif", dtype="uint16")
    _raster(tmp_path / "in" / "pan.tif", count=1)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump({"tiling": {"tile_size": 64, "halo": 0}, "models": {"landuse": {"weights": str(model_dir)}}})
    )
    result = CliRunner().invoke(
        cli, ["-q", "run", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--config", str(cfg)]
    )
    assert result.exit_code == 1, result.output
    err = result.stderr if hasattr(result, "stderr") else result.output
    assert "wide.tif: does not fit model 'landuse': expects uint8 pixels, the raster is uint16" in err
    assert "pan.tif: does not fit model 'landuse': reads bands [1, 2, 3] but the raster has 1 band(s)" in err
    assert "Traceback" not in result.output
    assert (tmp_path / "out" / "good" / "good_landuse.tif").exists() and good is not None
    assert not (tmp_path / "out" / "wide").exists()
