"""Honest defaults: models say what imagery they were trained on, and a run of models trained only on
synthetic scenes warns, once, on a raster that ``geoseg synth`` did not write (and records it).

Also: a local Ray started by geoseg prints no token-authentication warning (and keeps token auth on).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC_CONFIG = REPO / "configs" / "synthetic.yaml"  # the models trained on geoseg synth scenes only
MODELS = sorted(p.parent for p in (REPO / "models").glob("*/geoseg.json"))
SYNTH_ONLY = "trained only on synthetic scenes (geoseg synth)"


@pytest.mark.parametrize("model_dir", MODELS, ids=lambda p: p.name)
def test_every_model_declares_what_it_was_trained_on(model_dir):
    from geoseg.core.config import config_from_dict
    from geoseg.core.contract import load_contract

    trained_on = load_contract(model_dir / "geoseg.json").get("trained_on")
    assert trained_on is not None, f"{model_dir.name}/geoseg.json has no trained_on"
    assert trained_on["imagery"] == ("synthetic" if model_dir.name.startswith("synth-") else "real")
    assert trained_on["source"].strip()
    spec = config_from_dict({"models": {"m": {"weights": str(model_dir)}}}).models["m"]
    assert spec.trained_on is not None and spec.trained_on.imagery == trained_on["imagery"]


def test_default_config_is_real_and_the_synthetic_one_synthetic():
    from geoseg.api import DEFAULT_CONFIG
    from geoseg.core.config import load_config

    config = load_config(DEFAULT_CONFIG)
    assert {n: s.trained_on.imagery for n, s in config.models.items()} == {"landuse": "real", "buildings": "real"}
    config = load_config(SYNTHETIC_CONFIG)
    assert {n: s.trained_on.imagery for n, s in config.models.items()} == dict.fromkeys(config.models, "synthetic")


def test_synth_tags_its_scenes(tmp_path):
    import rasterio

    from geoseg.raster.read import inspect_scene
    from geoseg.train.synth import write_scene

    path = tmp_path / "s.tif"
    write_scene(path, size=128, seed=4)
    assert inspect_scene(str(path)).synthetic
    with rasterio.open(path) as ds:
        assert ds.tags()["GEOSEG_SYNTH_SEED"] == "4"
    _untagged_copy(path, tmp_path / "plain.tif")
    assert not inspect_scene(str(tmp_path / "plain.tif")).synthetic


def _info(name: str, synthetic: bool) -> SimpleNamespace:
    return SimpleNamespace(path=f"/data/{name}", synthetic=synthetic)


def test_imagery_warning_names_the_models_and_the_real_inputs():
    from geoseg.core.config import load_config
    from geoseg.core.contract import imagery_warning

    config = load_config(SYNTHETIC_CONFIG)
    assert imagery_warning(config, [_info("a.tif", True), _info("b.tif", True)]) is None
    run, scene = imagery_warning(config, [_info("a.tif", True), _info("cogeo.tif", False)])
    assert run == (
        "models landuse, buildings, ships were trained only on synthetic scenes (geoseg synth); 1 input "
        "is real imagery (cogeo.tif): expect wrong classes and counts. Use models trained on imagery like "
        "yours (docs/models.md)."
    )
    assert SYNTH_ONLY in scene and "this raster is not one" in scene
    run, _ = imagery_warning(config, [_info(f"{i}.tif", False) for i in range(5)])
    assert "5 inputs are real imagery (0.tif, 1.tif, 2.tif and 2 more)" in run
    real = load_config(SYNTHETIC_CONFIG).model_copy(
        update={"models": {"ships": config.models["ships"].model_copy(update={"trained_on": None})}}
    )
    assert imagery_warning(real, [_info("cogeo.tif", False)]) is None  # unknown training data: no claim


def test_train_records_synthetic_or_real(tmp_path):
    """``geoseg train`` writes trained_on: synthetic for geoseg synth scenes (generated or tagged files)."""
    from geoseg.train.config import load_train_config
    from geoseg.train.model_dir import trained_on
    from geoseg.train.synth import write_scene

    cfg = load_train_config(REPO / "configs" / "train" / "synth-ships.yaml")
    scenes = [SimpleNamespace(spec=s, name=f"{i}:synth.tif") for i, s in enumerate(cfg.scenes)]
    assert trained_on(cfg, scenes) == {"imagery": "synthetic", "source": cfg.data}

    write_scene(tmp_path / "tagged.tif", size=64, seed=1, nodata_corner=False)
    _untagged_copy(tmp_path / "tagged.tif", tmp_path / "real.tif")
    for image, imagery in (("tagged.tif", "synthetic"), ("real.tif", "real")):
        spec = cfg.scenes[0].model_copy(update={"synth": None, "image": image})
        file_cfg = cfg.model_copy(update={"base_dir": str(tmp_path), "data": ""})
        got = trained_on(file_cfg, [SimpleNamespace(spec=spec, name=f"0:{image}")])
        assert got["imagery"] == imagery and got["source"], got


def _untagged_copy(src: Path, dst: Path) -> None:
    """The same pixels and georeference, written by something other than geoseg synth."""
    import rasterio

    with rasterio.open(src) as ds:
        profile, data = ds.profile, ds.read()
    with rasterio.open(dst, "w", **profile) as ds:
        ds.write(data)


def test_quiet_cli_still_shows_the_run_warnings(monkeypatch, tmp_path):
    """``geoseg -q run`` hides the log, not a warning that the results may be wrong."""
    from click.testing import CliRunner

    import geoseg.runner.pipeline
    from geoseg.cli.main import cli

    report = geoseg.runner.pipeline.RunReport(warnings=["models x were trained only on synthetic scenes"])
    monkeypatch.setattr(geoseg.runner.pipeline, "run", lambda *a, **k: report)
    result = CliRunner().invoke(cli, ["-q", "run", "a.tif", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "warning: models x were trained only on synthetic scenes" in result.stderr


def test_synthetic_config_on_real_imagery_warns_once(shared_data, tmp_path):
    """``geoseg run`` with the synthetic models on a real aerial image (rasterio's cogeo.tif): one warning
    on stderr, recorded in the scene's summary.json and the run record. Run as a user runs it: a
    subprocess without RAY_AUTH_MODE (its own HOME, for the token Ray writes), so that the local Ray
    it starts would print Ray's token-authentication warning if geoseg did not ask for token auth."""
    scene = tmp_path / "cogeo.tif"
    shutil.copy(shared_data / "rasterio" / "cogeo.tif", scene)
    scene.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path / "home")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "geoseg.cli.main",
            "run",
            str(scene),
            "--out",
            str(out),
            "--config",
            str(SYNTHETIC_CONFIG),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if SYNTH_ONLY in ln]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("WARNING geoseg: models landuse, buildings, ships were trained only")
    assert "1 input is real imagery (cogeo.tif): expect wrong classes and counts" in lines[0]
    # Ray's own warning ("Token authentication is enabled ... Set RAY_AUTH_MODE=disabled to opt out"):
    assert "Token authentication" not in proc.stderr and "RAY_AUTH_MODE" not in proc.stderr, proc.stderr
    assert (tmp_path / "home" / ".ray" / "auth_token").is_file()  # token auth stayed on

    summary = json.loads((out / "cogeo" / "summary.json").read_text())
    assert len(summary["warnings"]) == 1 and SYNTH_ONLY in summary["warnings"][0]
    record = json.loads(next((out / "runs").glob("*.json")).read_text())
    assert record["warnings"] == [lines[0].removeprefix("WARNING geoseg: ")]


def test_synthetic_config_on_a_synth_scene_does_not_warn(ray_session, tmp_path, caplog):
    from geoseg.core.config import load_config
    from geoseg.runner.pipeline import run
    from geoseg.train.synth import write_scene

    scene = tmp_path / "synth.tif"
    write_scene(scene, size=256, seed=1)
    with caplog.at_level(logging.WARNING, logger="geoseg"):
        report = run([str(scene)], tmp_path / "out", load_config(SYNTHETIC_CONFIG), progress=False)
    assert report.ok and report.warnings == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert json.loads((tmp_path / "out" / "synth" / "summary.json").read_text())["warnings"] == []
