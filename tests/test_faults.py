"""Failures survived (issue 8): workers that die mid-run cost time, not outputs.

- The model actor's process is SIGKILLed while tiles are in flight: it is replaced, its batches are
  sent again, and every output equals an undisturbed run's.
- A worker node of a real multi-node Ray cluster (three nodes on this machine, in a subprocess:
  tests/helpers/cluster_run.py) is killed while a scene writer on it holds a scene half assembled:
  the run completes and every output equals an undisturbed run's.
- A tile that kills its model worker every time (a poison input, through a real model plugged in by
  the config: tests/helpers/fault_models.py) fails only its scene, with one plain line naming the
  scene, the tile window and the cause; the scenes around it complete, exactly.
- A model actor that dies while starting gives one clear line, not a hang.

"Equal" is checked against an undisturbed run of the same inputs: land-use rasters pixel for pixel,
instance rasters up to renumbering, polygons of every layer as sets of normalised WKB, summary.json's
counts and areas.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from helpers.outputs import assert_same_scene

from geoseg.core.config import load_config
from geoseg.core.errors import GeosegError
from geoseg.runner.pipeline import RunReport, run

HELPERS = Path(__file__).parent / "helpers"
CLUSTER_RUN = HELPERS / "cluster_run.py"
FAULT_MODELS = HELPERS / "fault_models.py"
# Small tiles and batches: many batches in flight at any moment.
OVERRIDES = {"tiling": {"tile_size": 256, "halo": 32}, "runtime": {"batch_size": 1}}


# -- comparing runs


def _scene_dirs(out: Path) -> dict[str, Path]:
    """Published scene folders by input path (from their summary.json; staging folders excluded)."""
    dirs = {}
    for summary in out.rglob("summary.json"):
        if not any(part.startswith(".") for part in summary.relative_to(out).parts):
            dirs[json.loads(summary.read_text())["input"]] = summary.parent
    return dirs


def assert_same_outputs(expected: Path, got: Path, inputs: list[str], config_path: Path) -> None:
    """Every input's outputs in ``got`` equal those in ``expected`` (an undisturbed run)."""
    tasks = {head: spec["task"] for head, spec in yaml.safe_load(config_path.read_text())["models"].items()}
    a_dirs, b_dirs = _scene_dirs(expected), _scene_dirs(got)
    for path in inputs:
        features = assert_same_scene(a_dirs[path], b_dirs[path], Path(path).stem, tasks)
        assert all(features.values()), (path, features)


def assert_no_partial_files(out: Path) -> None:
    left = [p for p in out.rglob("*") if ".partial" in p.name or p.name.endswith((".tmp", ".raw.tif", ".ids.tif"))]
    assert not left, left


# -- processes of this test session


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def _own_processes(prefix: str) -> set[int]:
    """Processes whose command line starts with ``prefix`` and that descend from this one (this
    session's local Ray: other runs on the machine are left alone)."""
    me, found = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if not fh.read().startswith(prefix.encode()):
                    continue
            parent = pid
            while parent > 1:
                parent = _ppid(parent)
                if parent == me:
                    found.add(pid)
                    break
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return found


def _published(out: Path) -> int:
    """Scenes published in ``out`` so far (0 while a folder moves under the walk: asked again soon)."""
    try:
        return len(_scene_dirs(out)) if out.is_dir() else 0
    except (OSError, ValueError):
        return 0


def _run_killing_model_actor(inputs: list[str], out: Path, config) -> tuple[RunReport, dict[str, int]]:
    """``run``, with the model actor SIGKILLed once a scene is published and others are in flight."""
    before = _own_processes("ray::PredictorWorker")
    killed: dict[str, int] = {}
    done = threading.Event()

    def kill_when_in_flight() -> None:
        while not done.is_set():
            published = _published(out)
            if 1 <= published < len(inputs):
                pids = _own_processes("ray::PredictorWorker") - before
                if pids:
                    pid = min(pids)
                    os.kill(pid, signal.SIGKILL)
                    killed.update(pid=pid, published_before=published)
                    return
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_when_in_flight, daemon=True)
    watcher.start()
    try:
        report = run(inputs, out, config, progress=False)
    finally:
        done.set()
        watcher.join()
    return report, killed


# -- inputs


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    from geoseg.train.synth import write_scene

    d = tmp_path_factory.mktemp("fault-scenes")
    paths = []
    for seed, size in ((31, 640), (32, 700), (33, 600), (34, 720)):
        write_scene(d / f"scene{seed}.tif", size=size, seed=seed)
        paths.append(str(d / f"scene{seed}.tif"))
    return paths


def _config_with(
    path: Path,
    oracle_config_path: Path,
    landuse_factory: str | None = None,
    models_file: Path = FAULT_MODELS,
    tiling: dict | None = None,
) -> Path:
    """The oracle config with the land-use model swapped for ``models_file:landuse_factory``."""
    cfg = yaml.safe_load(oracle_config_path.read_text())
    cfg["tiling"] = {**cfg["tiling"], **OVERRIDES["tiling"], **(tiling or {})}
    cfg["runtime"] = {**cfg["runtime"], **OVERRIDES["runtime"]}
    if landuse_factory:
        cfg["models"]["landuse"]["factory"] = f"{models_file}:{landuse_factory}"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def undisturbed(ray_session, scenes, oracle_config_path, tmp_path_factory) -> tuple[Path, Path]:
    """An undisturbed run of every scene (the outputs the disturbed runs must equal) and its config."""
    d = tmp_path_factory.mktemp("undisturbed")
    config_path = _config_with(d / "config.yaml", oracle_config_path)
    report = run(scenes, d / "out", load_config(config_path), progress=False)
    assert report.ok, report.failures
    return d / "out", config_path


# -- tests


def test_model_actor_killed_mid_run(ray_session, scenes, undisturbed, oracle_config_path, tmp_path, caplog):
    """SIGKILL the model actor once a scene is published and others are in flight: it is replaced,
    its batches are sent again, and the outputs equal an undisturbed run's."""
    inputs = scenes[:3]
    expected, config_path = undisturbed
    config = load_config(_config_with(tmp_path / "config.yaml", oracle_config_path, "slow_landuse"))
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="geoseg")
    report, killed = _run_killing_model_actor(inputs, out, config)
    assert killed, "the run ended before the model actor could be killed mid-run"
    assert killed["published_before"] < len(inputs)
    assert report.ok, report.failures
    assert "a model actor died" in caplog.text and "sent again" in caplog.text, caplog.text
    assert_same_outputs(expected, out, inputs, config_path)
    assert_no_partial_files(out)


def test_worker_node_dies_mid_run(scenes, undisturbed, oracle_config_path, tmp_path):
    """Kill a worker node of a 3-node cluster (a model actor with calls in flight, a scene writer
    with a scene half assembled, tasks, objects): the run completes and equals an undisturbed one."""
    expected, config_path = undisturbed
    slow = _config_with(tmp_path / "config.yaml", oracle_config_path, "slow_landuse")  # scenes still at work
    out, report_json = tmp_path / "out", tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(CLUSTER_RUN),
            "--remove-node-mid-run",
            str(slow),
            "{}",
            str(out),
            str(report_json),
            *scenes,
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(report_json.read_text())
    assert rep["removed"], f"the run ended before a node could be removed mid-run ({rep['seconds']} s)"
    assert 1 <= rep["removed"]["published_before"] < len(scenes)
    assert rep["ok"], (rep["failures"], rep["log"])
    assert len(rep["nodes"]) == 2  # the head and the worker node left
    log = "\n".join(rep["log"])
    assert "a scene writer died" in log and "redone from its first tile" in log, log
    assert "a model actor died" in log, log
    assert_same_outputs(expected, out, scenes, config_path)
    assert_no_partial_files(out)


def _with_poison(src: str, dst: Path, marker: tuple[int, int, int], row: int, col: int) -> None:
    """``src`` with a 6 x 6 block of the poison colour at (row, col)."""
    with rasterio.open(src) as ds:
        profile, data = ds.profile, ds.read()
    data[:3, row : row + 6, col : col + 6] = np.array(marker, dtype=data.dtype)[:, None, None]
    with rasterio.open(dst, "w", **profile) as ds:
        ds.write(data)


@pytest.fixture(scope="module")
def fault_models():
    """tests/helpers/fault_models.py, imported as the pipeline does (by file)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tests_helpers_fault_models", FAULT_MODELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_poison_tile_fails_only_its_scene(ray_session, scenes, undisturbed, fault_models, oracle_config_path, tmp_path):
    """A tile that kills its model worker each time fails its scene (one plain line naming the scene,
    the tile window and the cause); the scenes before and after it complete, equal to an undisturbed
    run (the poisoned model is the oracle on every other tile)."""
    clean = [scenes[0], scenes[2]]
    for path in clean:  # the poison colour is in none of the clean scenes
        with rasterio.open(path) as ds:
            rgb = ds.read([1, 2, 3])
        assert not (rgb == np.array(fault_models.MARKER, dtype=rgb.dtype)[:, None, None]).all(axis=0).any()
    poison = tmp_path / "in" / "poisoned.tif"
    poison.parent.mkdir()
    # In the core of tile (row 1, col 1) of a 700 px scene, further than the halo from its edges: only
    # that tile's read window holds it.
    _with_poison(scenes[1], poison, fault_models.MARKER, row=380, col=300)
    # Each tile one window (blend none), so that only tile 4's model call sees the poison: blended
    # windows on this 700 px scene all hold it, and the first tile to die would be named instead.
    config = load_config(
        _config_with(tmp_path / "config.yaml", oracle_config_path, "poison_landuse", tiling={"blend": "none"})
    )
    expected, config_path = undisturbed

    out = tmp_path / "out"
    inputs = [clean[0], str(poison), clean[1]]  # a scene after the poisoned one needs the model actor again
    report = run(inputs, out, config, progress=False)
    assert [p for p, _ in report.failures] == [str(poison)], report.failures
    msg = report.failures[0][1]
    assert "\n" not in msg and "\x1b" not in msg, repr(msg)
    assert msg.startswith(f"{poison}: tile 4 (window col_off=256 row_off=256 width=256 height=256)"), msg
    assert "the model worker died 3 times on this tile" in msg, msg
    assert "killed or crashed" in msg and "ray::" not in msg, msg
    assert sorted(s["input"] for s in report.summaries) == sorted(clean)
    assert_same_outputs(expected, out, clean, config_path)

    text = (out / "summary.csv").read_text()
    assert "\x1b" not in text
    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    failed = [r for r in rows if r["status"] == "failed"]
    assert [(r["input"], r["error"]) for r in failed] == [(str(poison), msg)]
    assert all("\n" not in v and "\r" not in v for r in rows for v in r.values())
    assert str(poison) not in _scene_dirs(out)
    assert_no_partial_files(out)


def test_model_actor_dying_at_start_is_one_clear_line(ray_session, scenes, oracle_config_path, tmp_path):
    """A model actor whose process dies while it builds the models: one line, no hang, no retry loop."""
    config = load_config(_config_with(tmp_path / "config.yaml", oracle_config_path, "crash_on_start"))
    started = time.monotonic()
    with pytest.raises(GeosegError) as exc:
        run([scenes[2]], tmp_path / "out", config, progress=False)
    msg = str(exc.value)
    assert "\n" not in msg and "\x1b" not in msg, repr(msg)
    assert msg.startswith("the model actor could not start: "), msg
    assert "killed or crashed" in msg, msg
    assert time.monotonic() - started < 120


def test_model_actor_that_cannot_be_replaced(ray_session, scenes, undisturbed, oracle_config_path, tmp_path):
    """The model actor is killed mid-run and every replacement dies while starting: after three tries
    the scenes still to do fail, each with one clear line; those done are complete; no hang."""
    models = tmp_path / "fault_models.py"  # a copy of its own: the marker of its first start goes beside it
    shutil.copy(FAULT_MODELS, models)
    config = load_config(_config_with(tmp_path / "config.yaml", oracle_config_path, "crash_on_restart", models))
    inputs, out = scenes[:3], tmp_path / "out"
    started = time.monotonic()
    report, killed = _run_killing_model_actor(inputs, out, config)
    assert killed, "the run ended before the model actor could be killed mid-run"
    assert time.monotonic() - started < 120
    done, failed = [s["input"] for s in report.summaries], dict(report.failures)
    assert sorted(done + list(failed)) == sorted(inputs) and failed and done
    for path, msg in failed.items():
        assert "\n" not in msg and "\x1b" not in msg, repr(msg)
        assert msg.startswith(f"{path}: the model actor could not be started again (3 tries; last: "), msg
        assert "killed or crashed" in msg, msg
    expected, config_path = undisturbed
    assert_same_outputs(expected, out, done, config_path)
    assert set(_scene_dirs(out)) == set(done)
    assert_no_partial_files(out)
