"""``geoseg train``: targets from polygons, chips from the run's tiling, a few Ray Train steps that
write a model directory ``geoseg run`` loads as it is (with held-out metrics in geoseg.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import yaml
from affine import Affine
from click.testing import CliRunner

from geoseg.core.config import config_from_dict
from geoseg.core.errors import ConfigError
from geoseg.models.load import check_models
from geoseg.train.config import SceneSpec, load_train_config
from geoseg.train.data import instance_targets, load_scene, make_chips

REPO = Path(__file__).resolve().parents[1]


def test_body_border_contact_targets():
    ids = np.zeros((12, 20), np.int32)
    ids[2:10, 2:9] = 1
    ids[2:10, 9:16] = 2  # shares a wall with object 1
    body, border, contact = instance_targets(ids, ["body", "border", "contact"])
    assert body.sum() == (ids > 0).sum()
    assert border[2, 4] and border[5, 2] and not border[5, 5]  # outer ring only
    assert contact[5, 8] and contact[5, 9] and not contact[5, 3] and not contact[0, 0]
    assert instance_targets(ids, ["body"]).shape == (1, 12, 20)


def _write_train_config(tmp_path: Path, **extra) -> Path:
    cfg = {
        "name": "tiny",
        "out": "model",
        "task": "instance",
        "classes": ["building"],
        "channels": ["body", "border", "contact"],
        "bands": [1, 2, 3],
        "band_names": ["red", "green", "blue"],
        "normalize": {"auto": "meanstd"},
        "model": {
            "arch": "Unet",
            "encoder": "tu-resnet10t",
            "arch_params": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]},
        },
        "scenes": [
            {
                "synth": {"size": 256, "seed": 1, "touching_pairs": 2},
                "labels": "buildings",
                "split": "both",
                "holdout": {"rows": [0.5, 1.0]},
            }
        ],
        "chip_size": 64,
        "chip_halo": 0,
        "eval_tile_size": 64,
        "eval_halo": 16,
        "train": {"steps": 3, "batch_size": 2},
        **extra,
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_chips_use_the_run_tiling_and_respect_the_split(tmp_path):
    cfg = load_train_config(_write_train_config(tmp_path))
    scene = load_scene(cfg, cfg.scenes[0], tmp_path, 0)
    assert scene.image.shape == (3, 256, 256) and scene.target.max() > 0
    chips = make_chips(cfg, [scene])
    # Training rows are the top half: 128 x 256 -> 2 x 4 chips of 64 (the nodata corner may drop some).
    assert 1 <= len(chips["x"]) <= 8 and chips["x"].shape[1:] == (3, 64, 64) and chips["x"].dtype == np.uint8
    assert chips["y"].shape[1:] == (3, 64, 64) and chips["valid"].dtype == bool


def test_labels_from_polygons_and_label_raster(tmp_path):
    tr = Affine(2.0, 0, 1000, 0, -2.0, 2000)
    img = tmp_path / "img.tif"
    with rasterio.open(
        img, "w", driver="GTiff", width=32, height=32, count=2, dtype="uint16", crs="EPSG:32618", transform=tr
    ) as ds:
        ds.write(np.full((2, 32, 32), 500, np.uint16))
    lab = tmp_path / "lab.tif"
    with rasterio.open(
        lab, "w", driver="GTiff", width=32, height=32, count=1, dtype="uint8", crs="EPSG:32618", transform=tr, nodata=0
    ) as ds:
        ds.write(np.tile(np.repeat(np.array([0, 3, 7], np.uint8), [11, 11, 10]), (32, 1))[None])
    gj = tmp_path / "lab.geojson"
    feats = [
        {"type": "Feature", "properties": {"kind": k}, "geometry": shapely.geometry.mapping(g)}
        for k, g in [("water", shapely.box(1000, 1960, 1020, 2000)), ("forest", shapely.box(1020, 1936, 1064, 2000))]
    ]
    crs = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32618"}}
    gj.write_text(json.dumps({"type": "FeatureCollection", "crs": crs, "features": feats}))
    base = {
        "name": "t",
        "out": "m",
        "task": "semantic",
        "classes": ["water", "forest"],
        "bands": [2, 1],
        "normalize": {"auto": "clip", "percentiles": [1, 99]},
    }
    (tmp_path / "r.yaml").write_text(
        yaml.safe_dump(
            {
                **base,
                "scenes": [
                    {
                        "image": "img.tif",
                        "labels": "lab.tif",
                        "class_values": {3: "water", 7: "forest"},
                        "split": "both",
                    }
                ],
            }
        )
    )
    cfg = load_train_config(tmp_path / "r.yaml")
    s = load_scene(cfg, cfg.scenes[0], tmp_path, 0)
    assert s.image.dtype == np.uint16 and s.image.shape == (2, 32, 32)
    assert (s.target[:, :11] == 255).all() and (s.target[:, 11:22] == 0).all() and (s.target[:, 22:] == 1).all()
    (tmp_path / "p.yaml").write_text(
        yaml.safe_dump(
            {**base, "scenes": [{"image": "img.tif", "labels": "lab.geojson", "class_field": "kind", "split": "both"}]}
        )
    )
    cfg = load_train_config(tmp_path / "p.yaml")
    s = load_scene(cfg, cfg.scenes[0], tmp_path, 0)
    assert (s.target[:20, :10] == 0).all() and (s.target[:32, 10:32] == 1).all() and (s.target[25:, :10] == 255).all()


def test_train_config_errors_are_one_line(tmp_path):
    path = _write_train_config(tmp_path, scenes=[{"synth": {"size": 256}, "labels": "buildings"}])
    with pytest.raises(ConfigError, match="no held-out data"):
        load_train_config(path)
    with pytest.raises(ValueError, match="exactly one of 'image' and 'synth'"):
        SceneSpec(labels="x.gpkg")


def test_train_a_few_steps_writes_a_model_geoseg_run_loads(ray_session, tmp_path):
    from geoseg.cli.main import cli

    path = _write_train_config(tmp_path, train={"steps": 3, "batch_size": 2, "hard_steps": 2})  # two rounds
    result = CliRunner().invoke(cli, ["-q", "train", str(path)])
    assert result.exit_code == 0, result.output
    assert "held-out objects" in result.output and "wrote" in result.output
    out = tmp_path / "model"
    assert {"config.json", "model.safetensors", "geoseg.json"} <= {p.name for p in out.iterdir()}
    contract = json.loads((out / "geoseg.json").read_text())
    assert contract["task"] == "instance" and contract["channels"] == ["body", "border", "contact"]
    assert contract["input"] == {"count": 3, "names": ["red", "green", "blue"], "dtype": "uint8", "gsd_m": 1.0}
    assert set(contract["metrics"]["objects"]) >= {"precision", "recall", "f1"}
    assert contract["training"]["steps"] == 3 and set(contract["normalize"]) == {"mean", "std"}
    assert contract["training"]["hard_steps"] == 2 and contract["training"]["hard_chips"] > 0
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert all(str(f.get_tensor(k).dtype) in ("torch.float16", "torch.int64") for k in f.keys())
    # Loadable as it is: the contract supplies every key of the head.
    cfg = config_from_dict({"models": {"buildings": {"weights": str(out)}}})
    check_models(cfg)
    assert cfg.models["buildings"].channels == ["body", "border", "contact"]
    # And re-scoring the written model gives the stored held-out metrics.
    result = CliRunner().invoke(cli, ["-q", "train", str(path), "--evaluate"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{") :]) == contract["metrics"]


def test_hard_chips_are_those_the_network_gets_most_wrong(tmp_path):
    """A network that calls every pixel a building errs most on the chips with the fewest
    buildings: with ``hard_fraction`` 0.5 those two of four chips are the hard ones."""
    import numpy as np
    import torch

    from geoseg.models.load import create_smp
    from geoseg.train.fit import _head_spec, hard_chips

    cfg = load_train_config(_write_train_config(tmp_path, train={"steps": 1, "hard_steps": 1, "hard_fraction": 0.5}))
    spec = _head_spec(cfg, "none")
    arch = cfg.model
    model = create_smp("t", arch.arch, arch.encoder, 3, spec.out_channels, arch.arch_params)
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    state["segmentation_head.0.bias"] = torch.tensor([10.0, -10.0, -10.0])  # body everywhere
    y = np.zeros((4, 3, 32, 32), np.uint8)
    for chip, side in enumerate((0, 4, 12, 24)):  # buildings of 0, 16, 144 and 576 pixels
        y[chip, 0, :side, :side] = 1
    chips = {
        "x": np.zeros((4, 3, 32, 32), np.uint8),
        "y": y,
        "valid": np.ones((4, 32, 32), bool),
        "image_valid": np.ones((4, 32, 32), bool),
    }
    assert hard_chips(cfg, spec, state, chips).tolist() == [True, True, False, False]


def test_efficientnet_unused_blocks_dropped_with_the_same_outputs():
    """An EfficientNet U-Net at depth 3 without the encoder blocks it never uses answers exactly as
    the whole one, with a fraction of its parameters."""
    import torch

    from geoseg.models.load import create_smp

    # lukemelas' EfficientNet (smp's efficientnet-b*) and timm's (smp's timm-tf_efficientnet_lite*)
    for encoder, depth, share in (("efficientnet-b0", 3, 0.1), ("timm-tf_efficientnet_lite0", 4, 0.4)):
        params = {"encoder_depth": depth, "decoder_channels": [16, 8, 8, 8][:depth]}
        torch.manual_seed(0)
        whole = create_smp("t", "Unet", encoder, 4, 1, params).eval()
        cut = create_smp("t", "Unet", encoder, 4, 1, {**params, "_drop_unused_blocks": True}).eval()
        kept = cut.state_dict()
        assert set(kept) < set(whole.state_dict())
        cut.load_state_dict({k: v for k, v in whole.state_dict().items() if k in kept})
        x = torch.randn(2, 4, 64, 64)
        with torch.no_grad():
            assert torch.equal(whole(x), cut(x))
        assert sum(p.numel() for p in cut.parameters()) < share * sum(p.numel() for p in whole.parameters())


def test_training_starts_from_a_published_encoder_and_writes_the_cut_network(ray_session, tmp_path):
    """``model.init`` fills the encoder from another network's weights (same names and shapes);
    a network trained with ``_drop_unused_blocks`` is written without the unused blocks and
    ``geoseg run``'s loader builds it the same way."""
    import torch
    from safetensors import safe_open

    from geoseg.cli.main import cli
    from geoseg.train.config import load_train_config
    from geoseg.train.fit import _head_spec, initial_state

    (tmp_path / "published.py").write_text(
        "import torch, segmentation_models_pytorch as smp\n"
        "def net():\n"
        "    torch.manual_seed(7)\n"
        "    return smp.Unet('efficientnet-b0', encoder_weights=None, in_channels=3, classes=2)\n"
    )
    model = {
        "arch": "Unet",
        "encoder": "efficientnet-b0",
        "arch_params": {"encoder_depth": 3, "decoder_channels": [16, 8, 8], "_drop_unused_blocks": True},
        "init": "published.py:net",
    }
    path = _write_train_config(tmp_path, model=model, train={"steps": 2, "batch_size": 2})
    cfg = load_train_config(path)
    start = initial_state(cfg, _head_spec(cfg, "none"))
    import importlib.util

    spec = importlib.util.spec_from_file_location("published", tmp_path / "published.py")
    assert spec and spec.loader
    published = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(published)
    source = published.net().state_dict()
    encoder = [k for k in start if k.startswith("encoder.")]
    assert encoder and all(torch.equal(start[k], source[k]) for k in encoder)
    assert not torch.equal(start["segmentation_head.0.weight"][:1], source["segmentation_head.0.weight"][:1])

    result = CliRunner().invoke(cli, ["-q", "train", str(path)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "model"
    assert json.loads((out / "config.json").read_text())["_drop_unused_blocks"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(start)  # the cut network's tensors, no more
    cfg_run = config_from_dict({"models": {"buildings": {"weights": str(out)}}})
    check_models(cfg_run)
