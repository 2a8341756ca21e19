"""What a run records in its output folder, so that nightly reruns redo only what changed.

- ``run-manifest.json``: one entry per input ever processed there: its fingerprint (size and
  modification time, or the object's ETag), the config and model versions it was made with (a
  hash of the resolved config and of every model's weights or code), its status, error, output
  folder, the run that made it and its timings. Rewritten whole at the end of each run.
- ``runs/<run id>.json``: one record per run, never overwritten, so no run erases another's.
- Each scene's own ``summary.json`` carries the same fingerprint, config hash and run id. It is
  published with the scene, so it is the truth when a run was killed before it rewrote the run
  manifest: a rerun then still skips the scenes the killed run finished.

An input is skipped when its published summary says it was done from the same bytes with the same
config and models; ``--force`` redoes all. Nothing here knows Ray.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from geoseg.core.config import Config
from geoseg.core.contract import hash_files, model_files, resolve
from geoseg.core.storage import OutputStore

RUN_MANIFEST = "run-manifest.json"
RUNS_FOLDER = "runs"


def new_run_id() -> str:
    """Sortable and unique: ``20261126T143652.123Z-host-1234`` (UTC, milliseconds, host, pid)."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
    time.sleep(0.002)  # two runs of one process never share a millisecond
    return f"{stamp}-{socket.gethostname()}-{os.getpid()}"


def input_key(path: str) -> str:
    """How the run manifest names an input: local paths absolute (a rerun from another working
    folder is the same input), remote ones as given."""
    return path if path.startswith("/vsi") or "://" in path else os.path.abspath(path)


def is_current(summary: dict[str, Any] | None, path: str, fingerprint: dict[str, Any] | None, config_id: str) -> bool:
    """True when a published summary shows ``path`` done, from the same bytes, with this config."""
    return (
        summary is not None
        and fingerprint is not None
        and summary.get("status") == "ok"
        and input_key(str(summary.get("input"))) == input_key(path)
        and summary.get("fingerprint") == fingerprint
        and summary.get("config") == config_id
    )


def model_versions(config: Config) -> dict[str, str]:
    """Per head, a hash of what defines its network: the weights (every file of a model folder),
    the TorchScript file, or the factory's source file. Missing files hash as ``missing`` (the
    model actor reports them)."""
    versions: dict[str, str] = {}
    for name, spec in config.models.items():
        files: list[Path] = []
        if spec.weights or spec.torchscript:
            p = resolve(str(spec.weights or spec.torchscript), config.base_dir)
            files = model_files(p)
        elif spec.factory:
            target = spec.factory.rsplit(":", 1)[0]
            if target.endswith(".py"):
                files = [resolve(target, config.base_dir)]
            else:
                found = importlib.util.find_spec(target)
                files = [Path(found.origin)] if found and found.origin else []
        try:
            versions[name] = hash_files(files) if files else "unknown"
        except OSError:
            versions[name] = "missing"
    return versions


def config_fingerprint(config: Config, versions: dict[str, str] | None = None) -> str:
    """Hash of the resolved config and of every model's version (``versions``, hashed here when not
    given): outputs made with an equal fingerprint came from the same settings and networks. A STAC
    API search (``stac_api``) chooses inputs, not how they are processed: it is left out."""
    versions = model_versions(config) if versions is None else versions
    text = config.model_dump_json(exclude={"stac_api"}) + json.dumps(versions, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_json(store: OutputStore, relpath: str) -> dict[str, Any] | None:
    text = store.read_text(relpath)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def load_manifest(store: OutputStore) -> dict[str, dict[str, Any]]:
    """The run manifest's entries by input (empty for a new output folder or an unreadable file)."""
    data = read_json(store, RUN_MANIFEST) or {}
    inputs = data.get("inputs")
    return inputs if isinstance(inputs, dict) else {}


def save_manifest(store: OutputStore, entries: dict[str, dict[str, Any]], models: dict[str, str]) -> None:
    data = {"geoseg_run_manifest": 1, "models": models, "inputs": dict(sorted(entries.items()))}
    store.write_text(RUN_MANIFEST, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def entry_from_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """A run manifest entry for a published scene."""
    return {
        "status": "ok",
        "error": None,
        "output": summary.get("output"),
        "fingerprint": summary.get("fingerprint"),
        "config": summary.get("config"),
        "run": summary.get("run"),
        "published_unix": summary.get("published_unix"),
        "seconds": summary.get("seconds"),
        "tiles": summary.get("tiles"),
        "tiles_resumed": summary.get("tiles_resumed", 0),
        "tiles_computed": (summary.get("tiles") or 0) - (summary.get("tiles_resumed") or 0),
    }


def write_run_record(store: OutputStore, run_id: str, record: dict[str, Any]) -> str:
    """``runs/<run id>.json``; returns its relative path."""
    relpath = f"{RUNS_FOLDER}/{run_id}.json"
    store.write_text(relpath, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    return relpath
