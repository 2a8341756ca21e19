"""The networks' number format: ``runtime.precision`` (auto, bf16, fp16, fp32) and a head that pins fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from geoseg.core.config import config_from_dict
from geoseg.models import infer
from geoseg.raster.grid import plan_tiles

PROBE = '''
import torch


class DtypeProbe(torch.nn.Module):
    """Two classes; class 1 wins where its convolution ran in bf16 (autocast on), class 0 otherwise."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)

    def forward(self, x):
        y = self.conv(x)
        low = 1.0 if y.dtype == torch.bfloat16 else 0.0
        b, _, h, w = x.shape
        return torch.stack([torch.full((b, h, w), 1.0 - low), torch.full((b, h, w), low)], dim=1)


def probe():
    return DtypeProbe()
'''


@pytest.mark.parametrize(
    "flags, expected",
    [
        ("fpu sse avx512f avx512_bf16 avx512vl", True),
        ("fpu sse amx_tile amx_bf16", True),
        ("fpu sse avx2 avx512f", False),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert infer.cpu_has_native_bf16(cpuinfo) is expected
    assert infer.cpu_has_native_bf16(tmp_path / "missing") is False  # not Linux: no native bf16 assumed


def test_auto_resolves_by_device_and_cpu(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(infer, "cpu_has_native_bf16", lambda: True)
    assert infer.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(infer, "cpu_has_native_bf16", lambda: False)
    assert infer.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert infer.resolve_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert infer.resolve_precision("auto", cuda) == "fp16"
    assert infer.resolve_precision("fp32", cuda) == "fp32" and infer.resolve_precision("bf16", cpu) == "bf16"


def _run(tmp_path: Path, precision: str, pinned: bool) -> int:
    (tmp_path / "probe.py").write_text(PROBE)
    head = {
        "task": "semantic",
        "classes": ["fp32", "bf16"],
        "bands": [1, 2, 3],
        "factory": "probe.py:probe",
        **({"precision": "fp32"} if pinned else {}),
    }
    cfg = config_from_dict(
        {
            "runtime": {"precision": precision, "device": "cpu"},
            "models": {"probe": head},
            "tiling": {"tile_size": 64, "halo": 0},
        },
        base_dir=str(tmp_path),
    )
    predictor = infer.Predictor(cfg)
    tile = next(plan_tiles(64, 64, 64, 0))
    payload = {"tile": tile, "status": "ok", "image": np.zeros((3, 64, 64), np.uint8), "valid": np.ones((64, 64), bool)}
    classes = predictor([payload])[0]["heads"]["probe"]
    assert len(np.unique(classes)) == 1
    return int(classes[0, 0])


def test_bf16_runs_in_bf16_and_a_pinned_head_in_fp32(tmp_path):
    assert _run(tmp_path, "bf16", pinned=False) == 1
    assert _run(tmp_path, "bf16", pinned=True) == 0
    assert _run(tmp_path, "fp32", pinned=False) == 0


def test_precision_flag_is_recorded_and_a_change_redoes_the_input(ray_session, tmp_path):
    """``geoseg run --precision``: the mask shows the format the network really ran in, each scene's
    summary.json and STAC Item record it (``device``), and changing it redoes an unchanged input."""
    import json

    import rasterio
    import yaml
    from click.testing import CliRunner

    from geoseg.cli.main import cli
    from geoseg.train.synth import write_scene

    scene = tmp_path / "scene.tif"
    write_scene(scene, size=96, seed=3)
    (tmp_path / "probe.py").write_text(PROBE)
    head = {"task": "semantic", "classes": ["fp32", "bf16"], "bands": [1, 2, 3], "factory": "probe.py:probe"}
    config = tmp_path / "probe.yaml"
    tiling = {"tile_size": 64, "halo": 0, "blend": "none"}
    config.write_text(yaml.safe_dump({"tiling": tiling, "models": {"probe": head}}))
    out = tmp_path / "out"
    made = []
    for precision in ("bf16", "fp32", "fp32"):
        args = ["-q", "run", str(scene), "--out", str(out), "--config", str(config), "--device", "cpu"]
        result = CliRunner().invoke(cli, [*args, "--precision", precision])
        assert result.exit_code == 0, result.output
        summary = json.loads((out / "scene" / "summary.json").read_text())
        item = json.loads((out / "scene" / "scene.stac.json").read_text())
        with rasterio.open(out / "scene" / "scene_probe.tif") as ds:
            classes = np.unique(ds.read(1, masked=True).compressed())
        made.append((summary["run"], summary["device"], item["properties"]["geoseg:device"], classes.tolist()))
    assert made[0][1:] == ("cpu bf16", "cpu bf16", [1])
    assert made[1][1:] == ("cpu fp32", "cpu fp32", [0]) and made[1][0] != made[0][0]  # redone
    assert made[2] == made[1]  # the same precision again: skipped, the outputs untouched
