"""Nightly runs over folders where scenes keep arriving: safe and distinct output names, reruns that
redo only what changed, and a driver killed mid-run whose rerun finishes the job."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from helpers.outputs import assert_same_scene

from geoseg.core.config import load_config
from geoseg.outputs.records import RUN_MANIFEST, config_fingerprint, model_versions
from geoseg.raster.discover import find_inputs, output_name
from geoseg.runner.pipeline import run
from geoseg.train.synth import write_scene

REPO = Path(__file__).resolve().parents[1]
# input path below the folder given -> the output folder it must get
NAMES = {
    "a/scene.tif": "a/scene",
    "b/scene.tif": "b/scene",
    "..tif": "_",
    ".tif.tif": "_tif",
    "summary.csv.tif": "summary.csv_",
    "runs.TIF": "runs_",
    "run-manifest.json.tiff": "run-manifest.json_",
    "collection.json.tif": "collection.json_",
    "my scene été.TIFF": "my scene été",
}


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: relative path -> (size, mtime_ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _assert_same_outputs(a: Path, b: Path, stem: str) -> None:
    """Two runs' outputs of one scene are equal (instance ids up to renumbering)."""
    assert_same_scene(a, b, stem, {"landuse": "semantic", "buildings": "instance", "ships": "instance"})


@pytest.fixture(scope="module")
def tiny_scene(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.tif"
    write_scene(path, size=160, seed=21)
    return path


@pytest.fixture(scope="module")
def fast_config(oracle_config_path):
    return load_config(oracle_config_path, {"tiling": {"tile_size": 128, "halo": 16}, "runtime": {"batch_size": 4}})


def test_output_names_are_safe_and_mirror_folders():
    for rel, want in NAMES.items():
        assert output_name(rel) == want, rel
    assert output_name("../../etc/x.tif") == "__/__/etc/x"
    assert output_name("a\\..\\x.tif") == "a_.._x"  # one name, not a path on any system


def test_discovery_globs_recursion_case_and_exclusions(tmp_path, tiny_scene):
    root = tmp_path / "in"
    for rel in ("x.tif", "y.TIFF", "sub/z.Tif", "sub/deeper/w.tif", ".hidden/h.tif", "s.truth/t.tif", "notes.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_scene, root / rel)
    (root / "out").mkdir()
    shutil.copy(tiny_scene, root / "out" / "mask.tif")  # outputs inside the input folder

    flat, errors = find_inputs([str(root)], exclude=root / "out")
    assert not errors and [f.name for f in flat] == ["x", "y"]
    deep, errors = find_inputs([str(root)], recursive=True, exclude=root / "out")
    assert not errors and [f.name for f in deep] == ["sub/deeper/w", "sub/z", "x", "y"]
    globbed, errors = find_inputs([str(root / "**" / "*.[tT]*")], exclude=root / "out")
    assert not errors and sorted(f.name for f in globbed) == ["sub/deeper/w", "sub/z", "x", "y"]
    none, errors = find_inputs([str(root / "nothing*.tif"), str(root / "sub" / "deeper" / "empty")])
    assert not none and [e.path for e in errors] == [str(root / "nothing*.tif"), str(root / "sub/deeper/empty")]


def test_every_name_writes_only_its_own_folder(ray_session, tmp_path, tiny_scene, fast_config):
    root = tmp_path / "in"
    for rel in NAMES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_scene, root / rel)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("a user's file")
    (tmp_path / "beside").mkdir()
    (tmp_path / "beside" / "keep.txt").write_text("next to the output folder")
    outside_before = {k: v for k, v in _tree(tmp_path).items() if not k.startswith("out/")}

    report = run([str(root)], out, fast_config, progress=False, recursive=True)

    assert report.ok, report.failures
    assert report.processed == len(NAMES)
    outside_after = {k: v for k, v in _tree(tmp_path).items() if not k.startswith("out/")}
    assert outside_after == outside_before  # inputs, neighbours: nothing outside --out changed
    assert (out / "keep.txt").read_text() == "a user's file"
    top = {p.name for p in out.iterdir()}
    assert top == {"keep.txt", "summary.csv", RUN_MANIFEST, "runs", "collection.json", "report.html"} | {
        n.split("/")[0] for n in NAMES.values()
    }
    assert (out / "summary.csv").is_file() and (out / RUN_MANIFEST).is_file() and (out / "runs").is_dir()
    with rasterio.open(tiny_scene.with_suffix(".truth") / "landuse.tif") as t:
        truth = t.read(1)
    for rel, name in NAMES.items():
        folder = out / name
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["input"] == str(root / rel) and summary["output"] == name
        leaf = name.rsplit("/", 1)[-1]
        assert sorted(p.name for p in folder.iterdir() if p.is_file()) == sorted(
            [
                f"{leaf}.gpkg",
                f"{leaf}_landuse.tif",
                f"{leaf}_buildings.tif",
                f"{leaf}_ships.tif",
                f"{leaf}_landuse.qml",
                f"{leaf}_buildings.qml",
                f"{leaf}_ships.qml",
                "manifest.json",
                "summary.json",
                f"{leaf}.stac.json",
                f"{leaf}_quicklook.png",
            ]
        )
        with rasterio.open(folder / f"{leaf}_landuse.tif") as m:
            assert np.array_equal(m.read(1), truth)
    manifest = json.loads((out / RUN_MANIFEST).read_text())["inputs"]
    assert {v["output"] for v in manifest.values()} == set(NAMES.values())


def test_an_input_may_not_take_another_inputs_folder(ray_session, tmp_path, tiny_scene, fast_config):
    first, second = tmp_path / "day1" / "scene.tif", tmp_path / "day2" / "scene.tif"
    for p in (first, second):
        p.parent.mkdir()
        shutil.copy(tiny_scene, p)
    out = tmp_path / "out"
    assert run([str(first)], out, fast_config, progress=False).ok
    before = _tree(out / "scene")

    report = run([str(second)], out, fast_config, progress=False)  # same file name, other folder

    assert [p for p, _ in report.failures] == [str(second)]
    error = report.failures[0][1]
    assert "holds the outputs of" in error and str(first) in error
    assert _tree(out / "scene") == before
    # In one run, a scene folder may not hold another scene's folder either.
    nested = tmp_path / "nested"
    (nested / "a").mkdir(parents=True)
    shutil.copy(tiny_scene, nested / "a.tif")
    shutil.copy(tiny_scene, nested / "a" / "b.tif")
    report = run([str(nested)], tmp_path / "out2", fast_config, progress=False, recursive=True)
    assert len(report.summaries) == 1 and len(report.failures) == 1
    assert "clashes with that of" in report.failures[0][1]


def test_reruns_redo_only_new_or_changed_inputs(ray_session, tmp_path, fast_config, oracle_config_path):
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for seed in (1, 2):
        write_scene(scenes / f"s{seed}.tif", size=300, seed=seed)
    out = tmp_path / "out"

    first = run([str(scenes)], out, fast_config, progress=False)
    assert first.ok and first.processed == 2
    files = _tree(out)
    scene_files = {k: v for k, v in files.items() if k.startswith(("s1/", "s2/"))}

    again = run([str(scenes)], out, fast_config, progress=False)
    assert again.ok and (again.processed, again.skipped) == (0, 2)
    assert again.tiles == 0 and again.device == ""  # no tile planned, no model actor started
    assert {k: v for k, v in _tree(out).items() if k in scene_files} == scene_files  # untouched
    assert {s["input"] for s in again.summaries} == {str(scenes / "s1.tif"), str(scenes / "s2.tif")}

    stat = (scenes / "s2.tif").stat()
    os.utime(scenes / "s2.tif", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes
    touched = run([str(scenes)], out, fast_config, progress=False)
    assert touched.ok and (touched.processed, touched.skipped) == (1, 1)
    after = _tree(out)
    assert {k: after[k] for k in scene_files if k.startswith("s1/")} == {
        k: v for k, v in scene_files.items() if k.startswith("s1/")
    }
    manifest = json.loads((out / RUN_MANIFEST).read_text())["inputs"]
    runs = {Path(k).name: v["run"] for k, v in manifest.items()}
    assert runs == {"s1.tif": first.run_id, "s2.tif": touched.run_id}
    assert manifest[str(scenes / "s2.tif")]["fingerprint"]["mtime_ns"] == stat.st_mtime_ns + 10**9

    forced = run([str(scenes)], out, fast_config, progress=False, force=True)
    assert forced.ok and (forced.processed, forced.skipped) == (2, 0)
    other = load_config(oracle_config_path, {"tiling": {"tile_size": 256, "halo": 16}})
    assert run([str(scenes)], out, other, progress=False).processed == 2  # another config: redone
    records = sorted((out / "runs").iterdir())
    assert len(records) == 5  # every run kept its record
    counts = [json.loads(p.read_text())["inputs"] for p in records]
    assert [(c["processed"], c["skipped"], c["failed"]) for c in counts] == [
        (2, 0, 0),
        (0, 2, 0),
        (1, 1, 0),
        (2, 0, 0),
        (2, 0, 0),
    ]


def test_model_versions_follow_the_weights(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(REPO / "models" / "synth-landuse", models / "synth-landuse")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("models:\n  landuse:\n    weights: models/synth-landuse\n")
    config = load_config(cfg)
    versions, fingerprint = model_versions(config), config_fingerprint(config)
    assert model_versions(config) == versions
    weights = models / "synth-landuse" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert model_versions(config) != versions
    assert config_fingerprint(config) != fingerprint


def _published_when_settled(out: Path, quiet_s: float = 3.0, limit_s: float = 30.0) -> set[str]:
    """Scenes published in ``out`` once that stops changing: the killed driver's scene writers are
    other processes, and one may still finish a publish until Ray ends the dead job's workers."""
    seen, since, deadline = None, time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() < deadline:
        now = {p.parent.name for p in out.glob("*/manifest.json")}
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
        time.sleep(0.1)
    return seen or set()


def test_driver_killed_mid_run_then_rerun(ray_session, tmp_path, oracle_config_path):
    """SIGKILL the driver while the large last scene is half done; the rerun skips the published
    scenes, replays the large scene's checkpointed tiles instead of recomputing them, and everything
    equals an undisturbed run. The killed run's Ray leftovers are swept by the next local run, and
    a run that ends normally leaves no Ray session folder behind."""
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for seed, size in ((31, 600), (32, 600), (33, 1500)):  # 25, 25 and 144 tiles of 128
        write_scene(scenes / f"k{seed}.tif", size=size, seed=seed)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))  # short: Ray's socket paths must fit
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "geoseg.cli.main",
        "-q",
        "run",
        str(scenes),
        "--out",
        str(out),
        "--config",
        str(oracle_config_path),
        "--tile-size",
        "128",
        "--halo",
        "16",
        "--batch-size",
        "2",
    ]
    try:
        driver = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        checkpoints = out / ".k33.partial" / "tiles"
        # Scenes assemble side by side: wait for a small one published and the large one well begun.
        while (
            (len(list(checkpoints.glob("*.pkl.z"))) < 12 or not list(out.glob("*/manifest.json")))
            and driver.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert driver.poll() is None, "the run ended before the kill; make the last scene larger"
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        done_before = _published_when_settled(out)
        assert 1 <= len(done_before) < 3 and "k33" not in done_before
        checkpointed = len(list(checkpoints.glob("*.pkl.z")))
        finished = {name: _tree(out / name) for name in done_before}
        killed_run = json.loads((out / next(iter(done_before)) / "summary.json").read_text())["run"]
        assert (out / ".geoseg.lock").exists()  # left by the killed run: the rerun takes it over

        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert f"{3 - len(done_before)} processed, {len(done_before)} unchanged" in rerun.stdout
        assert not [p for p in out.iterdir() if p.name.startswith(".")]  # lock, staging: all gone
        resumed = json.loads((out / "k33" / "summary.json").read_text())["tiles_resumed"]
        assert checkpointed <= resumed < 144  # the killed run's finished tiles were not recomputed
        for name, files in finished.items():
            assert _tree(out / name) == files  # not recomputed, not rewritten
        manifest = json.loads((out / RUN_MANIFEST).read_text())["inputs"]
        assert {Path(k).stem for k, v in manifest.items() if v["run"] == killed_run} == done_before
        assert manifest[str(scenes / "k33.tif")]["tiles_computed"] == 144 - resumed
        # Ray: the killed run's session was swept by the rerun, and the rerun removed its own.
        assert list((ray_tmp / "ray").glob("session_2*")) == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    undisturbed = tmp_path / "undisturbed"
    config = load_config(oracle_config_path, {"tiling": {"tile_size": 128, "halo": 16}, "runtime": {"batch_size": 2}})
    assert run([str(scenes)], undisturbed, config, progress=False).ok
    for seed in (31, 32, 33):
        _assert_same_outputs(out / f"k{seed}", undisturbed / f"k{seed}", f"k{seed}")


def test_a_full_disk_says_so(ray_session, tmp_path, fast_config):
    """Outputs on a disk that fills up: the scene fails with one line saying the disk is full (not
    GDAL's or SQLite's words), and nothing half-written stays."""
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        scene = tmp_path / "big.tif"
        write_scene(scene, size=1200, seed=5)
        report = run([str(scene)], disk / "out", fast_config, progress=False)
        assert [p for p, _ in report.failures] == [str(scene)]
        error = report.failures[0][1]
        assert error.startswith(f"{scene}: ") and "disk full" in error and "\n" not in error, error
        assert "INSERT" not in error and "transaction" not in error, error
        assert sorted(p.name for p in (disk / "out").iterdir()) == [
            "report.html",
            "run-manifest.json",
            "runs",
            "summary.csv",
        ]
    finally:
        subprocess.run(["umount", str(disk)], check=False)
