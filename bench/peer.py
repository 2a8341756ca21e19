"""The throw-away environment for the peer benchmark (geoai-py), never a geoseg dependency.

``bench/scratch/peer-venv`` (git-ignored) is a plain ``python3 -m venv`` whose site-packages holds a
``.pth`` file naming geoseg's own ``.venv`` site-packages: torch, torchvision, smp, rasterio and
numpy (gigabytes) are reused, not downloaded again; pip installs only what geoai-py adds, into the
peer venv, which comes first on ``sys.path`` (pip does not touch packages outside the venv it runs
in). If pip put its own torch into the peer venv anyway, the venv is rebuilt with ``--no-deps``
and geoai's run-time imports for ``geoai.inference`` named one by one.

The venv is kept between benchmark runs (even without ``--keep-scratch``) and reused while it
imports ``geoai.inference.predict_geotiff`` at the pinned version.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

GEOAI_PIN = "geoai-py==0.40.1"  # what `pip install geoai-py` resolved to here (Python 3.11, torch 2.14.1)
# geoai.inference's imports beyond what geoseg's venv has, for the --no-deps fallback
NO_DEPS_EXTRA = ["tqdm"]
PROBE = (
    "import json, importlib.metadata as m, torch; from geoai.inference import predict_geotiff; "
    "print(json.dumps({'geoai': m.version('geoai-py'), 'torch': torch.__version__, 'torch_file': torch.__file__}))"
)


def _site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise RuntimeError(f"no site-packages in {venv}")
    return found[0]


def _probe(python: Path) -> dict[str, Any] | None:
    try:
        res = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, timeout=300)
        return json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _pip(python: Path, args: list[str], log: Path, timeout: int) -> None:
    with open(log, "a") as fh:
        fh.write(f"\n$ pip {' '.join(args)}\n")
        fh.flush()
        res = subprocess.run([str(python), "-m", "pip", *args], stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    if res.returncode:
        tail = log.read_text()[-1500:]
        raise RuntimeError(f"pip {' '.join(args)} failed (exit {res.returncode}): ...{tail}")


def _create(venv: Path, host_site: Path) -> Path:
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    (_site_packages(venv) / "_geoseg_venv.pth").write_text(str(host_site) + "\n")
    return venv / "bin" / "python"


def ensure_peer_venv(venv: Path, timeout: int = 1800) -> dict[str, Any]:
    """A working peer venv: ``{"python", "geoai_version", "installed_s", "reused", "mode"}``, or
    ``{"error": ...}`` when geoai-py cannot be installed (the bench goes on)."""
    host_site = Path(sysconfig.get_paths()["purelib"])
    python = venv / "bin" / "python"
    want = GEOAI_PIN.split("==")[1]
    if python.exists():
        info = _probe(python)
        if info and info["geoai"] == want:
            return {
                "python": str(python),
                "geoai_version": info["geoai"],
                "reused": True,
                "installed_s": 0.0,
                "torch": info["torch"],
                "torch_from": info["torch_file"],
            }
    log = venv.parent / "peer-venv-install.log"
    venv.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    t = time.monotonic()
    mode = "deps"
    try:
        python = _create(venv, host_site)
        _pip(python, ["install", "-q", GEOAI_PIN], log, timeout)
        info = _probe(python)
        if info is None or not info["torch_file"].startswith(str(host_site)):
            # pip brought its own torch (or the install does not import): rebuild without dependencies
            mode = "no-deps"
            python = _create(venv, host_site)
            _pip(python, ["install", "-q", "--no-deps", GEOAI_PIN], log, timeout)
            _pip(python, ["install", "-q", *NO_DEPS_EXTRA], log, timeout)
            info = _probe(python)
        if info is None:
            err = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, timeout=300).stderr
            raise RuntimeError(f"geoai-py installed but does not import: {err.strip()[-1500:]}")
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return {"error": f"could not install {GEOAI_PIN} into {venv}: {exc}", "install_log": str(log)}
    return {
        "python": str(python),
        "geoai_version": info["geoai"],
        "reused": False,
        "mode": mode,
        "installed_s": round(time.monotonic() - t, 1),
        "torch": info["torch"],
        "torch_from": info["torch_file"],
        "host_site_packages": str(host_site),
        "install_log": str(log),
    }


if __name__ == "__main__":
    print(json.dumps(ensure_peer_venv(Path(__file__).resolve().parent / "scratch" / "peer-venv"), indent=2))
    sys.exit(0)
