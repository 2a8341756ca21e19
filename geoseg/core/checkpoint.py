"""Tile checkpoints: resume a large scene after a killed run without recomputing its finished tiles.

Granularity: one file per tile result, written by the scene's writer into the scene's staging
folder (``tiles/<index>.pkl.z``: the post-processed result, pickled and zlib-compressed, renamed
into place so a file is whole or absent). A tile is the unit the pipeline already moves and
retries, its result is small next to its pixels (class bytes, polygons, seam strips), and a
scene's stitching state can be rebuilt exactly by replaying its results in any order; anything
coarser (row bands, the masks on disk) would need the writer's in-memory seam state saved too.
Scenes of fewer than ``MIN_TILES`` tiles are not checkpointed: they are cheap to redo.

A checkpoint belongs to one input at one fingerprint with one config (``checkpoint.json`` beside
the tiles); any other stamp and the staging folder starts afresh. Only local (or shared) output
folders are checkpointed: an S3 scene stages in a temporary folder of the node that writes it.
Nothing here knows Ray or GDAL.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zlib
from pathlib import Path
from typing import Any

MIN_TILES = 16
TILES_DIR = "tiles"
STAMP_FILE = "checkpoint.json"
_SUFFIX = ".pkl.z"


def checkpoint_stamp(
    path: str, fingerprint: dict[str, Any] | None, config_id: str, n_tiles: int
) -> dict[str, Any] | None:
    """What a scene's checkpoint must match to be resumed; None when the scene is not checkpointed
    (fewer than ``MIN_TILES`` tiles, or the input's bytes cannot be told apart)."""
    if n_tiles < MIN_TILES or fingerprint is None or not config_id:
        return None
    return {"input": path, "fingerprint": fingerprint, "config": config_id}


def stamp_matches(staging: Path, stamp: dict[str, Any] | None) -> bool:
    if stamp is None:
        return False
    try:
        return json.loads((staging / STAMP_FILE).read_text()) == stamp
    except (OSError, ValueError):
        return False


def write_stamp(staging: Path, stamp: dict[str, Any]) -> None:
    (staging / TILES_DIR).mkdir(exist_ok=True)
    (staging / STAMP_FILE).write_text(json.dumps(stamp))


def finished_tiles(staging: Path | None, stamp: dict[str, Any] | None) -> list[int]:
    """Indexes of the tiles checkpointed in ``staging`` under ``stamp`` (none if it does not match)."""
    if staging is None or not stamp_matches(staging, stamp):
        return []
    try:
        names = os.listdir(staging / TILES_DIR)
    except OSError:
        return []
    return sorted(int(n[: -len(_SUFFIX)]) for n in names if n.endswith(_SUFFIX) and n[: -len(_SUFFIX)].isdigit())


def save_tile(staging: Path, index: int, result: Any) -> None:
    path = staging / TILES_DIR / f"{index}{_SUFFIX}"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(zlib.compress(pickle.dumps(result, protocol=5), 1))
    os.replace(tmp, path)


def load_tile(staging: Path, index: int) -> Any:
    return pickle.loads(zlib.decompress((staging / TILES_DIR / f"{index}{_SUFFIX}").read_bytes()))


def drop(staging: Path) -> None:
    """Remove the checkpoint before the scene's files are published."""
    shutil.rmtree(staging / TILES_DIR, ignore_errors=True)
    (staging / STAMP_FILE).unlink(missing_ok=True)
