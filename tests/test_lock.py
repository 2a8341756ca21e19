"""One run per output folder: a second run refuses and names the first; a dead run's lock is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from geoseg.core.config import load_config
from geoseg.core.errors import OutputError
from geoseg.runner.lock import LOCK_NAME
from geoseg.runner.pipeline import run


def _write_lock(out, pid: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(
        json.dumps({"host": socket.gethostname(), "pid": pid, "started": "2026-11-26T01:00:00"})
    )


def test_a_live_run_holding_the_folder_is_named_and_nothing_is_written(synth_scene, oracle_config_path, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "out"
        _write_lock(out, holder.pid)
        with pytest.raises(OutputError) as err:
            run([str(synth_scene)], out, load_config(oracle_config_path), progress=False)
        msg = str(err.value)
        assert f"pid {holder.pid}" in msg and socket.gethostname() in msg and "2026-11-26T01:00:00" in msg
        assert "\n" not in msg
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # its lock stays, nothing else written
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_run_is_taken_over(ray_session, synth_scene, oracle_config_path, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    _write_lock(out, dead.pid)
    report = run([str(synth_scene)], out, load_config(oracle_config_path), progress=False)
    assert report.ok, report.failures
    assert not (out / LOCK_NAME).exists()  # released at the end
    assert (out / "scene" / "summary.json").exists()


def test_two_commands_on_one_folder_the_second_refuses(synth_scene, oracle_config_path, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "geoseg.cli.main",
        "-q",
        "run",
        str(synth_scene),
        "--out",
        str(out),
        "--config",
        str(oracle_config_path),
        "--tile-size",
        "256",
    ]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 60
        while not (out / LOCK_NAME).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / LOCK_NAME).exists(), first.communicate()
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"pid {first.pid}" in second.stderr and "another geoseg run is writing here" in second.stderr
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
    assert not (out / LOCK_NAME).exists()
    assert json.loads((out / "scene" / "summary.json").read_text())["status"] == "ok"
