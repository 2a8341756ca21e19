"""Bad inputs fail alone, clearly and cleanly.

One run gets a good synthetic scene plus: a truncated COG, a truncated tiled GeoTIFF (fails after
some tiles were written), a text file named ``.tif``, a raster without CRS, a 1-band raster for
3-band models, an empty directory and a missing file. Each bad input gives one line naming the file and the
problem and a ``failed`` row in ``out/summary.csv``; nothing of it stays in ``out/`` (no folder,
no hidden ``.partial`` folder, no temp file); the good scene is complete and exact; the command
exits non-zero. An unwritable ``--out`` fails the whole run before any work, with one line.
Tested through ``geoseg.runner.pipeline.run``, click's CliRunner and a real ``geoseg`` subprocess.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.shutil
import yaml
from affine import Affine
from click.testing import CliRunner

from geoseg.cli.main import cli
from geoseg.core.config import load_config
from geoseg.core.errors import OutputError
from geoseg.runner.pipeline import run

REPO = Path(__file__).resolve().parents[1]
LANDUSE = ["water", "forest", "cropland", "urban", "bare"]

# input name -> words the one-line error must contain (besides the file's path)
EXPECTED = {
    "trunc_cog.tif": ["read failed", "damaged or truncated"],
    "trunc_tiled.tif": ["read failed", "damaged or truncated"],
    "notraster.tif": ["not a readable raster"],
    "nocrs.tif": ["no CRS"],
    "oneband.tif": ["1 band", "[1, 2, 3]"],
    "empty": ["no .tif"],
    "missing.tif": ["no such file"],
}


def write_config(path: Path) -> Path:
    cfg = {
        "tiling": {"tile_size": 256, "halo": 16},
        "runtime": {"batch_size": 4},
        "models": {
            "landuse": {
                "task": "semantic",
                "classes": LANDUSE,
                "bands": [1, 2, 3],
                "factory": "geoseg.train.synth:oracle_landuse",
            },
            "ships": {
                "task": "instance",
                "classes": ["ship"],
                "bands": [1, 2, 3],
                "factory": "geoseg.train.synth:oracle_ships",
            },
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _truncate(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Path]:
    """The bad inputs and one good synthetic scene, each in its own folder."""
    from geoseg.train.synth import write_scene

    root = tmp_path_factory.mktemp("bad_inputs")
    d = root / "in"
    d.mkdir()
    paths: dict[str, Path] = {}
    # A real tiled COG (JPEG, with overviews) cut to half its bytes: the header still opens.
    paths["trunc_cog.tif"] = d / "trunc_cog.tif"
    _truncate(shared_data / "rasterio" / "cogeo.tif", paths["trunc_cog.tif"])
    # A real raster re-encoded as a tiled GeoTIFF, cut in half: the first tile reads, later ones fail.
    tiled = root / "tiled_full.tif"
    rasterio.shutil.copy(
        shared_data / "rasterio" / "RGB.byte.tif",
        tiled,
        driver="GTiff",
        tiled=True,
        blockxsize=128,
        blockysize=128,
        compress="deflate",
    )
    paths["trunc_tiled.tif"] = d / "trunc_tiled.tif"
    _truncate(tiled, paths["trunc_tiled.tif"])
    paths["notraster.tif"] = d / "notraster.tif"
    paths["notraster.tif"].write_text("station,lat,lon\nA,38.9,-77.0\n")
    paths["nocrs.tif"] = d / "nocrs.tif"
    with rasterio.open(
        paths["nocrs.tif"],
        "w",
        driver="GTiff",
        width=64,
        height=64,
        count=3,
        dtype="uint8",
        transform=Affine(1, 0, 1000, 0, -1, 2000),
    ) as ds:
        ds.write(np.full((3, 64, 64), 120, np.uint8))
    paths["oneband.tif"] = d / "oneband.tif"
    with rasterio.open(
        paths["oneband.tif"],
        "w",
        driver="GTiff",
        width=64,
        height=64,
        count=1,
        dtype="uint8",
        crs="EPSG:32618",
        transform=Affine(1, 0, 500000, 0, -1, 4300000),
        nodata=0,
    ) as ds:
        ds.write(np.full((1, 64, 64), 120, np.uint8))
    paths["missing.tif"] = d / "missing.tif"  # never created
    paths["empty"] = root / "empty"
    paths["empty"].mkdir()
    (paths["empty"] / "notes.txt").write_text("no rasters here\n")
    good_dir = root / "good"
    good_dir.mkdir()
    paths["good"] = good_dir / "good.tif"
    write_scene(paths["good"], size=320, seed=2)
    return paths


def input_list(paths: dict[str, Path]) -> list[str]:
    bad = [str(paths[k]) for k in EXPECTED]
    return bad[:3] + [str(paths["good"])] + bad[3:]  # the good scene in the middle of the bad ones


def check_failures(failures: list[tuple[str, str]], paths: dict[str, Path]) -> None:
    by_input = {Path(p).name: msg for p, msg in failures}
    assert set(by_input) == set(EXPECTED), by_input
    for name, words in EXPECTED.items():
        msg = by_input[name]
        assert "\n" not in msg, msg
        assert str(paths[name]) in msg, msg
        for w in words:
            assert w in msg, (name, msg)
        assert "See previous exception" not in msg, f"error does not say what is wrong: {msg}"
        assert "Traceback" not in msg


def check_good_scene(out: Path, good: Path) -> None:
    scene = out / good.stem
    assert sorted(p.name for p in scene.iterdir()) == sorted(
        [
            "good.gpkg",
            "good_landuse.tif",
            "good_ships.tif",
            "good_landuse.qml",
            "good_ships.qml",
            "manifest.json",
            "summary.json",
            "good.stac.json",
            "good_quicklook.png",
        ]
    )
    truth = good.with_suffix(".truth")
    with (
        rasterio.open(scene / "good_landuse.tif") as m,
        rasterio.open(truth / "landuse.tif") as t,
        rasterio.open(good) as src,
    ):
        assert m.crs == src.crs and m.transform == src.transform and m.shape == src.shape
        mask, want = m.read(1), t.read(1)
    assert np.array_equal(mask, want)  # context-free oracle: exactly the truth
    summary = json.loads((scene / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert summary["valid_pixels"] == int((want != 255).sum())
    classes = summary["models"]["landuse"]["classes"]
    for k, name in enumerate(LANDUSE):
        assert classes[name]["pixels"] == int((want == k).sum())
    n_ships = pyogrio.read_info(truth / "objects.gpkg", layer="ships")["features"]
    assert summary["models"]["ships"]["classes"]["ship"]["count"] == n_ships
    assert pyogrio.read_info(scene / "good.gpkg", layer="ships")["features"] == n_ships


def check_out_dir_clean(out: Path, good: Path) -> None:
    """Only the good scene's folder and the run's files; nothing hidden or temporary anywhere."""
    assert sorted(os.listdir(out)) == sorted(
        ["summary.csv", "run-manifest.json", "runs", "collection.json", "report.html", good.stem]
    )
    for dirpath, dirnames, filenames in os.walk(out):
        for name in dirnames + filenames:
            assert not name.startswith("."), os.path.join(dirpath, name)
            assert not name.endswith((".tmp", ".partial", ".raw.tif", ".ids.tif", ".aux.xml")), os.path.join(
                dirpath, name
            )


def check_summary_csv(out: Path, paths: dict[str, Path], failures: list[tuple[str, str]]) -> None:
    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    failed = {Path(r["input"]).name: r for r in rows if r["status"] == "failed"}
    assert set(failed) == set(EXPECTED)
    errors = dict((Path(p).name, m) for p, m in failures)
    for name, row in failed.items():
        assert row["error"] == errors[name]
        assert row["model"] == row["pixels"] == ""
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["input"] for r in ok} == {str(paths["good"])}
    assert {(r["model"], r["class"]) for r in ok} == {("landuse", c) for c in LANDUSE} | {("ships", "ship")}


@pytest.fixture(scope="module")
def first_run(ray_session, inputs, tmp_path_factory: pytest.TempPathFactory):
    """``geoseg.runner.pipeline.run`` over all inputs into a fresh ``out/``."""
    d = tmp_path_factory.mktemp("run")
    cfg = write_config(d / "config.yaml")
    out = d / "out"
    report = run(input_list(inputs), out, load_config(cfg), progress=False)
    return cfg, out, report


def test_pipeline_run_isolates_bad_inputs(inputs, first_run):
    _, out, report = first_run
    assert not report.ok
    assert [s["input"] for s in report.summaries] == [str(inputs["good"])]
    check_failures(report.failures, inputs)
    check_good_scene(out, inputs["good"])
    check_out_dir_clean(out, inputs["good"])
    check_summary_csv(out, inputs, report.failures)
    # Inputs are left as they were: no sidecar files written next to them.
    assert sorted(p.name for p in inputs["nocrs.tif"].parent.iterdir()) == sorted(
        k for k in EXPECTED if k not in ("empty", "missing.tif")
    )


def test_cli_run_isolates_bad_inputs(ray_session, inputs, first_run):
    """The same inputs through the CLI, into the same ``out/`` (a rerun: the good scene is unchanged
    and skipped, the bad inputs are tried again and still leave nothing)."""
    cfg, out, _ = first_run
    result = CliRunner().invoke(cli, ["-q", "run", *input_list(inputs), "--out", str(out), "--config", str(cfg)])
    assert result.exit_code == 1, (result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == len(EXPECTED), result.stderr
    failures = []
    for name in EXPECTED:
        hits = [ln for ln in lines if str(inputs[name]) in ln]
        assert len(hits) == 1, (name, result.stderr)
        for w in EXPECTED[name]:
            assert w in hits[0], hits[0]
        failures.append((str(inputs[name]), hits[0].removeprefix("error: ")))
    assert "0 processed, 1 unchanged (skipped), 7 failed" in result.stdout
    check_failures(failures, inputs)
    check_good_scene(out, inputs["good"])
    check_out_dir_clean(out, inputs["good"])
    check_summary_csv(out, inputs, failures)


def _unwritable_out(tmp_path: Path) -> Path:
    """A folder under a regular file: cannot be created, even by root."""
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("a file, not a folder\n")
    return blocker / "out"


def test_unwritable_out_pipeline(inputs, tmp_path):
    config = load_config(write_config(tmp_path / "config.yaml"))
    out = _unwritable_out(tmp_path)
    with pytest.raises(OutputError) as exc:
        run([str(inputs["good"])], out, config, progress=False)
    msg = str(exc.value)
    assert "\n" not in msg and str(out) in msg and "not writable" in msg
    assert out.parent.is_file() and out.parent.read_text() == "a file, not a folder\n"


def test_unwritable_out_cli_subprocess(inputs, tmp_path):
    """The real command: one line on stderr naming the folder and the problem, exit status 2."""
    cfg = write_config(tmp_path / "config.yaml")
    out = _unwritable_out(tmp_path)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "geoseg.cli.main",
            "-q",
            "run",
            str(inputs["good"]),
            "--out",
            str(out),
            "--config",
            str(cfg),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and str(out) in lines[0] and "not writable" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
