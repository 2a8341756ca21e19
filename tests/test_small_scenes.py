"""Small scenes share model calls: the windows of several scenes go through a network together, and
every scene's outputs are byte for byte those it gets alone.

The scenes are crops of a synthetic scene (objects, a nodata corner) in several sizes, so that the
calls mix window shapes and partly valid windows. The networks are the synthetic config's U-Nets in
float32, where oneDNN's results for a window alone and in a batch of 8 differ in the last bits
(by 1e-6 here) unless every call of a window shape has the same shape
(``geoseg.models.blend._call_size``), and a fourth head that makes such bits visible: a U-Net
whose two class scores are the sine and cosine of its output times 1e5."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import yaml
from rasterio.windows import Window

from geoseg.core.config import Config, config_from_dict
from geoseg.models.infer import Predictor
from geoseg.raster.grid import plan_tiles
from geoseg.raster.read import inspect_scene
from geoseg.raster.windows import blend_plan
from geoseg.runner.workers import read_batch

REPO = Path(__file__).resolve().parents[1]
# (col, row, width, height) in the synthetic scene: windows of 64, 96 and 128 px, two crops in its
# nodata corner (partly valid windows).
CROPS = [
    (0, 0, 96, 96),
    (100, 0, 64, 64),
    (300, 300, 64, 64),
    (700, 200, 64, 64),
    (900, 900, 80, 48),
    (1200, 400, 40, 120),
    (500, 1000, 64, 64),
    (1400, 1400, 64, 64),
    (200, 800, 96, 90),
    (1000, 100, 64, 64),
    (640, 640, 64, 64),
]


@pytest.fixture(scope="module")
def small_scenes(synth_scene: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("small")
    paths = []
    with rasterio.open(synth_scene) as src:
        for k, (col, row, w, h) in enumerate(CROPS):
            win = Window(col, row, w, h)
            profile = {**src.profile, "width": w, "height": h, "transform": src.window_transform(win)}
            profile.update(tiled=False, blockxsize=None, blockysize=None)
            path = folder / f"crop{k:02d}.tif"
            with rasterio.open(path, "w", **{k: v for k, v in profile.items() if v is not None}) as dst:
                dst.write(src.read(window=win))
                dst.update_tags(**src.tags())  # (marked synthetic, as the scene is)
            paths.append(path)
    return paths


AMPLIFIED = """
import segmentation_models_pytorch as smp
import torch


class Amplified(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = smp.Unet("tu-resnet10t", encoder_weights=None, in_channels=3, classes=1, encoder_depth=3,
                            decoder_channels=(32, 16, 8))

    def forward(self, x):
        y = self.net(x / 255.0)[:, 0].float() * 1e5
        return torch.stack([torch.sin(y), torch.cos(y)], dim=1)


def amplified():
    return Amplified()
"""


def _config(folder: Path) -> Config:
    """The synthetic config in float32, with the amplifying head."""
    (folder / "amplified.py").write_text(AMPLIFIED)
    data = yaml.safe_load((REPO / "configs" / "synthetic.yaml").read_text())
    for head in data["models"].values():
        head["weights"] = str((REPO / "configs" / head["weights"]).resolve())
    data["models"]["amplified"] = {
        "task": "semantic",
        "classes": ["sine", "cosine"],
        "bands": [1, 2, 3],
        "factory": "amplified.py:amplified",
    }
    data["runtime"] = {**data.get("runtime", {}), "precision": "fp32"}
    return config_from_dict(data, base_dir=str(folder))


def _payloads_and_plan(path: Path, config, index: int):
    info = inspect_scene(str(path))
    plan = blend_plan(config, info, f"test/{index}")
    tiles = [
        dataclasses.replace(t, context=plan.context(t.read))
        for t in plan_tiles(info.width, info.height, config.tiling.tile_size, config.tiling.halo, scene=index)
    ]
    return read_batch(info.raster, tiles, config.bands_needed, {}), plan


def test_scenes_share_model_calls_and_get_what_they_get_alone(small_scenes, tmp_path, monkeypatch):
    config = _config(tmp_path)
    parts = [_payloads_and_plan(p, config, i) for i, p in enumerate(small_scenes)]
    monkeypatch.setenv("GEOSEG_CACHE_DIR", "off")  # networks from smp: a traced copy takes no forward hook
    predictor = Predictor(config, num_threads=1)
    calls = {name: [] for name in predictor.heads}
    for name, (_, model, _) in predictor.heads.items():
        model.register_forward_hook(lambda m, args, out, name=name: calls[name].append(args[0].shape[0]))

    alone = [predictor.predict_scenes([part])[0] for part in parts]
    calls_alone = {name: len(c) for name, c in calls.items()}
    predictor.cache.items.clear()  # nothing computed alone may be reused
    for c in calls.values():
        c.clear()
    together = predictor.predict_scenes(parts)

    for name, seen in calls.items():
        assert len(seen) < calls_alone[name] / 2, (name, len(seen), calls_alone[name])  # calls were shared
    for k, (a, b) in enumerate(zip(alone, together)):
        assert len(a) == len(b) == 1
        assert a[0]["status"] == b[0]["status"] == "ok"
        for name in predictor.heads:
            x, y = a[0]["heads"][name], b[0]["heads"][name]
            assert x.dtype == y.dtype == np.uint8 and x.shape == y.shape, (k, name)
            assert x.tobytes() == y.tobytes(), (k, name, int((x != y).sum()))


def _features(gpkg: Path) -> dict[str, object]:
    """Every layer of a GeoPackage (the counts table and styles included): its columns and geometries
    as read, but the time a style was written."""
    out = {}
    for layer, _ in pyogrio.list_layers(gpkg):
        meta, _, geoms, fields = pyogrio.raw.read(gpkg, layer=layer)
        names = list(meta["fields"])
        out[layer] = (names, [bytes(g) for g in geoms] if geoms is not None else None)
        out[layer + "/fields"] = [list(map(str, f)) for n, f in zip(names, fields) if n != "update_time"]
    return out


def test_a_run_in_shared_calls_writes_the_same_bytes_as_one_scene_at_a_time(ray_session, small_scenes, tmp_path):
    import geoseg

    config = _config(tmp_path)
    runs = {}
    for batch in (1, 8):  # batch_size 1: each call holds one scene's windows; 8: up to 8 scenes'
        out = tmp_path / f"batch{batch}"
        report = geoseg.run([str(p) for p in small_scenes], out, config, batch_size=batch, progress=False)
        assert not report.failures and len(report.summaries) == len(small_scenes)
        runs[batch] = out
    objects = 0
    for path in small_scenes:
        a, b = runs[1] / path.stem, runs[8] / path.stem
        for head in config.models:
            with rasterio.open(a / f"{path.stem}_{head}.tif") as x, rasterio.open(b / f"{path.stem}_{head}.tif") as y:
                assert x.profile == y.profile, (path.stem, head)
                assert x.read().tobytes() == y.read().tobytes(), (path.stem, head)
                # A small mask is one tile just big enough (a power of two), still a COG.
                side = max(x.shape)
                assert x.block_shapes[0][0] == x.block_shapes[0][1] >= side > x.block_shapes[0][0] // 2
                assert x.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        fa, fb = _features(a / f"{path.stem}.gpkg"), _features(b / f"{path.stem}.gpkg")
        assert fa == fb, path.stem
        objects += sum(len(v[1] or []) for k, v in fa.items() if k in ("buildings", "ships"))
    assert objects > 0  # the crops hold objects: the comparison covers polygons, not only empty layers
