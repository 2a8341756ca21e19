"""The ``geoseg`` command line: flags override the config, config errors name the file and key,
``geoseg synth`` writes a scene and its truth.

Flag overrides are observed from the outside: a real (tiny) model whose output encodes the side
of the tiles it was given, so the written mask tells the padded tile side (tile size + 2 halo) the
run really used; the batch size (which on a CPU sets the tiles per task, not per network call)
through the settings fingerprint the run stamped into the scene's summary.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import yaml
from click.testing import CliRunner

from geoseg.cli.main import cli, main
from geoseg.core.config import load_config
from geoseg.core.errors import ConfigError
from geoseg.outputs.records import config_fingerprint
from geoseg.raster.grid import padded_size

N_CODES = 64
PROBE = '''
import torch


class SideProbe(torch.nn.Module):
    """Semantic head whose class at every pixel is the side of its input // 32."""

    def forward(self, x):
        b, _, h, w = x.shape
        out = torch.zeros(b, 64, h, w)
        out[:, min(w // 32, 63)] = 1.0
        return out


def side_probe():
    return SideProbe()
'''


def probe_config(d: Path, tiling: dict, runtime: dict) -> Path:
    (d / "probe.py").write_text(PROBE)
    classes = [f"c{i}" for i in range(N_CODES)]
    cfg = {
        "tiling": tiling,
        "runtime": runtime,
        "models": {
            "side": {"task": "semantic", "classes": classes, "bands": [1, 2, 3], "factory": "probe.py:side_probe"},
        },
    }
    path = d / "probe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def small_scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from geoseg.train.synth import write_scene

    path = tmp_path_factory.mktemp("cli_scene") / "small.tif"
    write_scene(path, size=300, seed=4)
    return path


def test_flags_override_config(ray_session, small_scene, tmp_path):
    cfg = probe_config(tmp_path, {"tile_size": 512, "halo": 64, "blend": "none"}, {"batch_size": 8})
    out = tmp_path / "out"
    args = [
        "-q",
        "run",
        str(small_scene),
        "--out",
        str(out),
        "--config",
        str(cfg),
        "--tile-size",
        "128",
        "--halo",
        "8",
        "--batch-size",
        "2",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "1 processed, 0 unchanged (skipped), 0 failed; 9 tiles" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == f"report: {out / 'report.html'}"  # the page to open
    summary = json.loads((out / "small" / "summary.json").read_text())
    assert summary["tiles"] == math.ceil(300 / 128) ** 2 == 9  # the config's 512 would give 1 tile
    with rasterio.open(out / "small" / "small_side.tif") as ds:
        side = ds.read(1)
    valid = side != 255
    assert valid.any()
    # Tile 128 + 2 x halo 8 = 144, padded to 160; the config's values would give 640 (or 544, 256).
    # The corner tile's core is 44 x 44 (300 = 2 x 128 + 44): it runs in a smaller square, 64.
    assert padded_size(128, 8) == 160 and padded_size(44, 8) == 64
    assert set(np.unique(side[:256][valid[:256]])) == set(np.unique(side[:, :256][valid[:, :256]])) == {160 // 32}
    assert set(np.unique(side[256:, 256:][valid[256:, 256:]])) == {64 // 32}
    # Batches of 2 tiles (the config says 8).
    assert summary["config"] == _fingerprint(cfg, tiling={"tile_size": 128, "halo": 8}, runtime={"batch_size": 2})
    assert summary["config"] != _fingerprint(cfg)


def test_window_flags_reach_the_model_actor(ray_session, small_scene, tmp_path):
    """Blended windows (the default): the probe sees the window side, whatever the tile size; a
    raster smaller than a window runs as one window just big enough (300 -> 320)."""
    cfg = probe_config(tmp_path, {"tile_size": 128, "halo": 8}, {"batch_size": 2})
    for flags, side in (([], 320), (["--window", "128", "--overlap", "32"], 128)):
        out = tmp_path / f"out{side}"
        result = CliRunner().invoke(
            cli, ["-q", "run", str(small_scene), "--out", str(out), "--config", str(cfg), *flags]
        )
        assert result.exit_code == 0, (result.output, result.exception)
        with rasterio.open(out / "small" / "small_side.tif") as ds:
            seen = ds.read(1)
        assert set(np.unique(seen[seen != 255])) == {side // 32}
    result = CliRunner().invoke(
        cli, ["-q", "run", str(small_scene), "--out", str(tmp_path / "bad"), "--config", str(cfg), "--window", "100"]
    )
    assert str(result.exception) == "--window: window must be a multiple of 32 (encoders downsample by 32), got 100"


def test_config_values_apply_without_flags(ray_session, small_scene, tmp_path):
    cfg = probe_config(tmp_path, {"tile_size": 256, "halo": 16, "blend": "none"}, {"batch_size": 3})
    out = tmp_path / "out"
    even = tmp_path / "even.tif"  # 2 x 2 whole tiles: every tile runs in the configured square
    from geoseg.train.synth import write_scene

    write_scene(even, size=512, seed=4)
    result = CliRunner().invoke(cli, ["-q", "run", str(even), "--out", str(out), "--config", str(cfg)])
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads((out / "even" / "summary.json").read_text())
    assert summary["tiles"] == 4
    with rasterio.open(out / "even" / "even_side.tif") as ds:
        side = ds.read(1)
    valid = side != 255
    assert set(np.unique(side[valid])) == {padded_size(256, 16) // 32}
    assert summary["config"] == _fingerprint(cfg)
    assert summary["config"] != _fingerprint(cfg, runtime={"batch_size": 8})  # the default


def _fingerprint(path: Path, **sections: dict) -> str:
    """The settings fingerprint of the config file with sections' keys replaced, as a run stamps it."""
    return config_fingerprint(load_config(path, sections))


BASE = {
    "tiling": {"tile_size": 256, "halo": 16},
    "models": {
        "landuse": {
            "task": "semantic",
            "classes": ["a", "b", "c", "d", "e"],
            "bands": [1, 2, 3],
            "factory": "geoseg.train.synth:oracle_landuse",
        }
    },
}


def _with(path: Path, edit) -> Path:
    cfg = json.loads(json.dumps(BASE))
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    "name, edit, flags, words",
    [
        ("band_zero", lambda c: c["models"]["landuse"].update(bands=[0]), [], ["models.landuse", "bands", "1-based"]),
        ("unknown_key", lambda c: c["tiling"].update(tile_szie=128), [], ["tiling.tile_szie", "not permitted"]),
        ("unknown_model_key", lambda c: c["models"]["landuse"].update(factroy="x:y"), [], ["models.landuse.factroy"]),
        ("bad_task", lambda c: c["models"]["landuse"].update(task="panoptic"), [], ["models.landuse.task"]),
        ("flag_out_of_range", lambda c: None, ["--tile-size", "8"], ["16"]),
    ],
)
def test_config_error_names_file_and_key(tmp_path, small_scene, name, edit, flags, words):
    cfg = _with(tmp_path / f"{name}.yaml", edit)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["-q", "run", str(small_scene), "--out", str(out), "--config", str(cfg), *flags])
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError), result.exception
    msg = str(result.exception)
    # A bad value from a flag names the flag; one from the file names the file (and the key).
    assert msg.startswith("--tile-size: " if flags else f"{cfg}: "), msg
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    assert not out.exists(), "a config error must stop the run before anything is written"


def _main(monkeypatch, capsys, args: list[str]) -> tuple[int, str, str]:
    """The console entry point, in-process: what ``geoseg ARGS`` prints and returns."""
    monkeypatch.setattr(sys, "argv", ["geoseg", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_entry_point_config_error_is_one_line_exit_2(tmp_path, small_scene, monkeypatch, capsys):
    cfg = _with(tmp_path / "cfg.yaml", lambda c: c["models"]["landuse"].update(bands=[0]))
    code, _, err = _main(
        monkeypatch, capsys, ["-q", "run", str(small_scene), "--out", str(tmp_path / "out"), "--config", str(cfg)]
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {cfg}: models.landuse: "), lines[0]
    assert "bands" in lines[0]


def test_entry_point_missing_config_file(tmp_path, small_scene, monkeypatch, capsys):
    cfg = tmp_path / "nope.yaml"
    code, _, err = _main(
        monkeypatch, capsys, ["-q", "run", str(small_scene), "--out", str(tmp_path / "out"), "--config", str(cfg)]
    )
    assert code == 2
    assert err.strip().splitlines() == [f"error: {cfg}: cannot read: No such file or directory"]


def test_entry_point_yaml_syntax_error_is_one_line(tmp_path, small_scene, monkeypatch, capsys):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("tiling: {tile_size: 256\nmodels: [\n")
    code, _, err = _main(
        monkeypatch, capsys, ["-q", "run", str(small_scene), "--out", str(tmp_path / "out"), "--config", str(cfg)]
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {cfg}: not valid YAML"), err


def test_synth_writes_scene_and_truth(tmp_path):
    out = tmp_path / "scenes" / "s.tif"
    result = CliRunner().invoke(cli, ["synth", str(out), "--size", "320", "--seed", "1"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert str(out) in result.stdout and "buildings" in result.stdout and "ships" in result.stdout
    with rasterio.open(out) as ds:
        assert (ds.width, ds.height, ds.count, ds.dtypes[0], ds.nodata) == (320, 320, 3, "uint8", 0)
        assert ds.crs.to_epsg() == 32618 and (ds.transform.a, ds.transform.e) == (1.0, -1.0)
        valid = np.all(ds.read_masks() > 0, axis=0)
    truth = out.with_suffix(".truth")
    with rasterio.open(truth / "landuse.tif") as lu:
        assert lu.crs.to_epsg() == 32618 and lu.shape == (320, 320)
        classes = lu.read(1)
    assert np.array_equal(classes == 255, ~valid)  # truth nodata is exactly the image's nodata
    assert classes[valid].max() < 5
    layers = {name for name, _ in pyogrio.list_layers(truth / "objects.gpkg")}
    assert {"buildings", "ships"} <= layers
    n_b = pyogrio.read_info(truth / "objects.gpkg", layer="buildings")["features"]
    n_s = pyogrio.read_info(truth / "objects.gpkg", layer="ships")["features"]
    assert n_b + n_s > 0
    # No temporary files left beside the outputs.
    assert sorted(p.name for p in out.parent.iterdir()) == ["s.tif", "s.truth"]
    assert sorted(p.name for p in truth.iterdir()) == ["landuse.tif", "objects.gpkg"]


def test_synth_geographic_default_pixel_size(tmp_path):
    out = tmp_path / "geo.tif"
    result = CliRunner().invoke(cli, ["synth", str(out), "--size", "128", "--crs", "EPSG:4326"])
    assert result.exit_code == 0, (result.output, result.exception)
    with rasterio.open(out) as ds:
        assert ds.crs.to_epsg() == 4326
        assert ds.transform.a == pytest.approx(1e-5) and ds.transform.e == pytest.approx(-1e-5)
