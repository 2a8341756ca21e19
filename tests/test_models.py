"""Model sources: smp save_pretrained directories, .safetensors / .pt state dicts, TorchScript,
factories; mismatches fail at start-up with a message naming the model; each source runs through
``geoseg run``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml

from geoseg.core.config import config_from_dict, load_config
from geoseg.core.errors import ConfigError, ModelError
from geoseg.models.forward import normalize as _normalize
from geoseg.models.forward import predict_probs
from geoseg.models.infer import Predictor
from geoseg.models.load import build_model, check_models, create_smp

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

TINY = {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}


def _smp(arch: str = "Unet", in_channels: int = 3, classes: int = 5, **params) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_smp("t", arch, "tu-resnet10t", in_channels, classes, params or TINY).eval()


def _semantic(source: dict, bands=(1, 2, 3), **extra) -> dict:
    return {
        "models": {
            "landuse": {
                "task": "semantic",
                "classes": ["water", "forest", "cropland", "urban", "bare"],
                "bands": list(bands),
                "normalize": {"scale": 255},
                **source,
                **extra,
            }
        }
    }


@pytest.fixture(scope="module")
def smp_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("smp") / "unet"
    _smp().save_pretrained(str(d))
    return d


@pytest.mark.parametrize(
    "arch,params",
    [
        ("Unet", TINY),
        ("UnetPlusPlus", TINY),
        ("FPN", {"encoder_depth": 5, "decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32}),
        ("DeepLabV3Plus", {"encoder_depth": 4, "decoder_channels": 32, "decoder_atrous_rates": [2, 4, 6]}),
        ("Segformer", {"encoder_depth": 3, "decoder_segmentation_channels": 32}),
    ],
)
def test_smp_architectures_load_from_state_dict_files(tmp_path, arch, params):
    ref = _smp(arch, **params)
    x = torch.rand(1, 3, 64, 64)
    for suffix in (".safetensors", ".pt"):
        path = tmp_path / f"w{suffix}"
        if suffix == ".pt":
            torch.save(ref.state_dict(), path)
        else:
            from safetensors.torch import save_file

            save_file(ref.state_dict(), str(path))
        cfg = config_from_dict(
            _semantic({"weights": path.name, "arch": arch.lower(), "encoder": "tu-resnet10t", "arch_params": params}),
            base_dir=str(tmp_path),
        )
        check_models(cfg)
        model = build_model("landuse", cfg.models["landuse"], cfg.base_dir)
        with torch.inference_mode():
            assert torch.allclose(model(x), ref(x), atol=1e-5)


def test_save_pretrained_directory_needs_no_arch(smp_dir):
    cfg = config_from_dict(_semantic({"weights": str(smp_dir)}))
    check_models(cfg)
    assert type(build_model("landuse", cfg.models["landuse"])).__name__ == "Unet"


@pytest.mark.parametrize(
    "source,extra,message",
    [
        ({"weights": "missing_dir"}, {}, "not found"),
        ({"weights": "SMPDIR"}, {"bands": [1]}, "takes 3 input band(s) but the config reads 1 band(s) [1]"),
        ({"weights": "SMPDIR"}, {"classes": ["a", "b"]}, "outputs 5 channel(s) but the config has 2"),
        ({"weights": "SMPDIR", "arch": "FPN"}, {}, "config says arch 'FPN' but"),
        ({"weights": "W.pt", "arch": "Unet", "encoder": "tu-resnet10t"}, {}, "do not fit the configured network"),
        ({"weights": "W.pt"}, {}, "set 'arch'"),
        ({"weights": "W.pt", "arch": "NoSuchNet"}, {}, "unknown arch 'NoSuchNet'"),
        ({"torchscript": "W.pt"}, {}, "is not a TorchScript file"),
        ({"arch": "Unet"}, {}, "needs 'weights'"),
        ({"factory": "geoseg.train.synth:oracle_landuse", "torchscript": "W.pt"}, {}, "only one model source"),
    ],
)
def test_mismatch_fails_at_start_with_clear_message(tmp_path, smp_dir, source, extra, message):
    # A state dict of another network (wrong keys): a 1x1 conv.
    torch.save(torch.nn.Conv2d(3, 5, 1).state_dict(), tmp_path / "W.pt")
    source = {k: (str(smp_dir) if v == "SMPDIR" else v) for k, v in source.items()}
    with pytest.raises((ModelError, ConfigError)) as err:
        cfg = config_from_dict(_semantic(source, **extra), base_dir=str(tmp_path))
        check_models(cfg)
    assert message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_torchscript_with_wrong_band_count_names_the_model(tmp_path):
    scripted = torch.jit.script(_smp(in_channels=3))
    scripted.save(str(tmp_path / "m.ts"))
    cfg = config_from_dict(_semantic({"torchscript": "m.ts"}, bands=[1]), base_dir=str(tmp_path))
    with pytest.raises(ModelError, match=r"model 'landuse': fails on a 1x1x64x64 input .*take 1 band"):
        check_models(cfg)


def test_normalisations_use_fixed_values():
    base = {"task": "semantic", "classes": ["a"], "bands": [1, 2], "factory": "geoseg.train.synth:oracle_landuse"}
    x = torch.tensor([[[[0.0, 1000.0]], [[50.0, 9000.0]]]])  # B=1, C=2, H=1, W=2
    clip = config_from_dict({"models": {"m": {**base, "normalize": {"clip_low": [0, 100], "clip_high": [500, 1100]}}}})
    y = _normalize(x, clip.models["m"])
    assert torch.allclose(y, torch.tensor([[[[0.0, 1.0]], [[0.0, 1.0]]]]))
    db = config_from_dict({"models": {"m": {**base, "normalize": {"db": True, "mean": [0, 10], "std": [1, 10]}}}})
    y = _normalize(torch.tensor([[[[1.0, 10.0]], [[0.0, 100.0]]]]), db.models["m"])
    assert torch.allclose(y, torch.tensor([[[[0.0, 10.0]], [[-7.0, 1.0]]]]))  # 0 -> floor 1e-6 -> -60 dB
    with pytest.raises(ConfigError, match="clip_high must be > its clip_low"):
        config_from_dict({"models": {"m": {**base, "normalize": {"clip_low": [5, 5], "clip_high": [1, 9]}}}})
    with pytest.raises(
        ConfigError, match=r"bands \[1, 2, 3\] feed 3 band\(s\) to a model whose normalize has 2 values per band"
    ):
        config_from_dict({"models": {"m": {**base, "bands": [1, 2, 3], "normalize": {"mean": [0, 0], "std": [1, 1]}}}})


def test_flip_tta_averages_flipped_passes():
    model = _smp(classes=2)
    spec = config_from_dict(_semantic({"factory": "geoseg.train.synth:oracle_landuse"}, classes=["a", "b"])).models[
        "landuse"
    ]
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        plain = predict_probs(model, x, spec, "none")
        tta = predict_probs(model, x, spec, "flip")
        manual = (
            sum(
                torch.flip(torch.softmax(model(torch.flip(x, d)), 1), d) if d else torch.softmax(model(x), 1)
                for d in [(), (3,), (2,), (2, 3)]
            )
            / 4
        )
    assert torch.allclose(tta, manual, atol=1e-6)
    assert torch.allclose(plain.sum(1), torch.ones(2, 64, 64))
    assert not torch.allclose(plain, tta)


def test_predictor_loads_models_once_and_honours_tta(smp_dir):
    cfg = config_from_dict({**_semantic({"weights": str(smp_dir)}, tta="flip"), "tiling": {"tile_size": 64, "halo": 0}})
    pred = Predictor(cfg)
    spec, model, _ = pred.heads["landuse"]
    assert spec.tta == "flip" and not model.training
    from geoseg.raster.grid import plan_tiles

    tile = next(plan_tiles(64, 64, 64, 0))
    payload = {
        "tile": tile,
        "status": "ok",
        "image": np.random.default_rng(0).integers(0, 255, (3, 64, 64), np.uint8),
        "valid": np.ones((64, 64), bool),
    }
    out = pred([payload])[0]
    assert out["heads"]["landuse"].shape == (64, 64) and out["heads"]["landuse"].max() < 5


def _scene(tmp_path: Path) -> Path:
    from geoseg.train.synth import write_scene

    path = tmp_path / "scene.tif"
    write_scene(path, size=256, seed=5)
    return path


def test_every_source_runs_through_geoseg_run(ray_session, tmp_path, smp_dir):
    """One run, one head per source: save_pretrained dir, .safetensors, .pt, TorchScript, factory."""
    from safetensors.torch import save_file

    from geoseg.runner.pipeline import run

    state = _smp().state_dict()
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pt")
    torch.jit.script(_smp()).save(str(tmp_path / "w.ts"))
    arch = {"arch": "Unet", "encoder": "tu-resnet10t", "arch_params": TINY}
    head = _semantic({})["models"]["landuse"]
    models = {
        "pretrained": {**head, "weights": str(smp_dir)},
        "safetensors": {**head, "weights": "w.safetensors", **arch},
        "statedict": {**head, "weights": "w.pt", **arch},
        "scripted": {**head, "torchscript": "w.ts"},
        "oracle": {**head, "normalize": "none", "factory": "geoseg.train.synth:oracle_landuse"},
    }
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump({"tiling": {"tile_size": 128, "halo": 16}, "models": models}))
    report = run([str(_scene(tmp_path))], tmp_path / "out", load_config(cfg_path), progress=False)
    assert report.ok, report.failures
    masks = {}
    for name in models:
        with rasterio.open(tmp_path / "out" / "scene" / f"scene_{name}.tif") as ds:
            masks[name] = ds.read(1)
    # The four loaders of the same weights agree exactly; the oracle is a different network.
    for name in ("safetensors", "statedict", "scripted"):
        np.testing.assert_array_equal(masks[name], masks["pretrained"])
    summary = json.loads((tmp_path / "out" / "scene" / "summary.json").read_text())
    assert set(summary["models"]) == set(models)


def test_nodata_pixels_enter_the_network_as_zero_after_normalisation(smp_dir):
    """Raw fill values (e.g. -99999) never reach the network: masked pixels are 0 once normalised."""
    cfg = config_from_dict(
        {
            **_semantic({"weights": str(smp_dir)}, normalize={"mean": [10, 20, 30], "std": [2, 2, 2]}),
            "tiling": {"tile_size": 64, "halo": 0},
        }
    )
    pred = Predictor(cfg)
    from geoseg.raster.grid import plan_tiles

    tile = next(plan_tiles(64, 64, 64, 0))
    image = np.random.default_rng(1).uniform(0, 40, (3, 64, 64)).astype(np.float32)
    valid = np.ones((64, 64), bool)
    valid[:20, :30] = False
    filled, fill_value = image.copy(), image.copy()
    filled[:, ~valid] = -99999.0
    fill_value[:, ~valid] = np.array([10, 20, 30], np.float32)[:, None]  # the mean: 0 once normalised

    def run(img, v):
        return pred([{"tile": tile, "status": "ok", "image": img, "valid": v}])[0]["heads"]["landuse"]

    np.testing.assert_array_equal(run(filled, valid), run(fill_value, np.ones_like(valid)))


@pytest.mark.parametrize(
    "preset, expected",
    [(None, ["OMP_WAIT_POLICY = 'PASSIVE'", "GOMP_SPINCOUNT = '0'"]), ("ACTIVE", ["OMP_WAIT_POLICY = 'ACTIVE'"])],
)
def test_model_actor_process_waits_passively_unless_the_user_chose(preset, expected):
    """The model actor's process sets OpenMP's wait policy before torch loads it: read back from
    libgomp itself (OMP_DISPLAY_ENV), in a fresh interpreter as a Ray worker is; a policy the user
    set wins. (libgomp's default also displays as PASSIVE, but spins 300000 times first: the spin
    count tells them apart.)"""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = (
        "from geoseg.runner.workers import passive_openmp; passive_openmp(); import torch; "
        "torch.ones(64, 64) @ torch.ones(64, 64)"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for line in expected:
        assert line in done.stderr


def test_imagenet_encoder_weights_recognise_a_photograph():
    """The ImageNet weights a training run starts from (geoseg.models.imagenet) are mapped onto
    timm's modules by order; a mapping off by one layer would still load. Put through the whole
    classifier, they must name scikit-image's photograph of a cat (ImageNet classes 281-285) and
    of a cup of espresso (967), as a network trained on ImageNet does."""
    import timm
    from skimage import data, transform

    from geoseg.models.imagenet import efficientnet_lite0, lite0_state_for

    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    classifier.load_state_dict(lite0_state_for(classifier))
    for photo, expected in ((data.chelsea(), set(range(281, 286))), (data.coffee(), {967})):
        x = (transform.resize(photo, (224, 224), preserve_range=True) - 127.5) / 128
        with torch.inference_mode():
            probs = classifier(torch.tensor(x.transpose(2, 0, 1)[None], dtype=torch.float32)).softmax(1)[0]
        assert int(probs.argmax()) in expected and float(probs.max()) > 0.5
    # The training start: the same encoder weights inside smp's U-Net.
    unet = efficientnet_lite0()
    assert torch.equal(unet.encoder.conv_stem.weight, classifier.conv_stem.weight)
    assert torch.equal(unet.encoder.blocks[6][0].conv_pwl.weight, classifier.blocks[6][0].conv_pwl.weight)
