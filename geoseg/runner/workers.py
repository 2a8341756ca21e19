"""What the driver sends out, as plain callables: read a batch of tiles, run the models on it,
post-process it. ``geoseg.runner.pipeline`` turns them into Ray tasks and actors; nothing here imports Ray.

Work moves in batches of tiles of one scene (one task or actor call per batch, not per tile): the
driver's cost per pixel then shrinks with the batch, and a batch's arrays travel between workers
through Ray's object store without passing through the driver. Where scenes are smaller than a
batch, the batches of several scenes go together through one task or call (``*_batches``,
``predict_scenes``), each batch's results a return value of its own.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from geoseg.core.config import Config
from geoseg.core.errors import GeosegError, InputError
from geoseg.core.s3 import apply_storage_env
from geoseg.raster.grid import Tile
from geoseg.runner.jemalloc import keep_freed_pages, release_freed_pages

if TYPE_CHECKING:
    from geoseg.core.units import PixelAreas
    from geoseg.models.postprocess import TileResult

# Heavy libraries are imported where they are used: the driver imports this module only to name
# the functions, and the model actor (torch) never needs GDAL, scipy or scikit-image.


@dataclass(frozen=True)
class TileAck:
    """What the driver learns of one tile once its scene's writer has taken it (defined here, in a
    light module, because the driver unpickles it)."""

    scene: int
    index: int
    status: str  # ok | empty | error
    core_pixels: int
    error: str | None = None


def warm_up_worker() -> None:
    """Import the libraries of reading and post-processing (GDAL, scipy, scikit-image, shapely) in a
    fresh worker while the models load, not when the first tile is waiting."""
    from geoseg.models import postprocess  # noqa: F401
    from geoseg.raster import read  # noqa: F401


def ray_returns(values: list[Any]) -> Any:
    """A group's results as a Ray task with ``num_returns=len(values)`` hands them on: one value
    each, or the value itself for a group of one."""
    return values[0] if len(values) == 1 else values


def read_batch(path: str, tiles: list[Tile], bands: list[int], storage_env: dict[str, str]) -> list[dict[str, Any]]:
    """Read every tile's window; a tile that cannot be read carries its error (its scene fails)."""
    apply_storage_env(storage_env)
    return [_read_one(path, tile, bands) for tile in tiles]


def read_batches(parts: list[tuple[str, list[Tile]]], bands: list[int], storage_env: dict[str, str]) -> Any:
    """``read_batch`` for the batches of several scenes (``parts``: raster and tiles); one list of
    payloads per part (``ray_returns``)."""
    return ray_returns([read_batch(path, tiles, bands, storage_env) for path, tiles in parts])


def _read_one(path: str, tile: Tile, bands: list[int]) -> dict[str, Any]:
    from geoseg.raster.read import read_tile

    try:
        data = read_tile(path, tile, bands)
    except InputError as exc:
        return {"tile": tile, "status": "error", "error": str(exc)}
    except Exception as exc:  # GDAL can fail in many ways on a damaged file; keep it to this scene
        return {"tile": tile, "status": "error", "error": f"{path}: read failed in tile {tile.index} ({exc})"}
    if not data["valid"][tile.read_in_source].any():
        return {"tile": tile, "status": "empty"}
    return {"tile": tile, "status": "ok", **data}


def postprocess_batch(
    preds: list[dict[str, Any]], config: Config, pixel_areas: PixelAreas, grid_shape: tuple[int, int]
) -> list[TileResult]:  # noqa: F821 (lazy import)
    """Decode, measure and vectorise each tile; ``pixel_areas`` gives each tile's pixel areas."""
    from geoseg.models.postprocess import TileResult, postprocess_tile

    out = []
    for pred in preds:
        tile: Tile = pred["tile"]
        try:
            core = tile.core
            area = (
                pixel_areas.window(int(core.row_off), int(core.col_off), int(core.height), int(core.width))
                if pred["status"] == "ok"
                else None
            )
            out.append(postprocess_tile(pred, config, area, grid_shape))
        except Exception as exc:
            out.append(
                TileResult(tile=tile, status="error", error=f"post-processing failed on tile {tile.index}: {exc}")
            )
    return out


def postprocess_batches(config: Config, grid_shapes: list[tuple[int, int]], *refs: Any) -> Any:
    """``postprocess_batch`` for the batches of several scenes: ``refs`` holds each batch's model
    output, then each scene's ``PixelAreas`` (passed as arguments so that Ray resolves them); one
    list of results per batch (``ray_returns``)."""
    n = len(grid_shapes)
    preds, areas = refs[:n], refs[n:]
    return ray_returns([postprocess_batch(p, config, a, g) for p, a, g in zip(preds, areas, grid_shapes)])


def passive_openmp() -> None:
    """Let torch's OpenMP threads sleep when idle instead of spinning (``OMP_WAIT_POLICY=PASSIVE``,
    unless the user set a policy), in this process, before torch loads OpenMP.

    A CPU model actor runs OpenMP on every core beside the read, post-processing and writer
    processes; spin-waiting burnt the cores those need (a 4096^2 U-Net on 2 cores: actor CPU 38.4
    -> 31.9 s, run 29.6 -> 27.0 s). Set in the process rather than through a Ray ``runtime_env``,
    for which Ray starts a fresh worker (no prestarted one fits): with it the first tile of the
    default config came 0.7-1.1 s later (9.5-9.6 s from the process start against 8.4-8.8 s, 3 runs
    each). Harmless on a GPU, where torch's CPU threads do little.
    """
    if "torch" in sys.modules:  # OpenMP read its settings already: too late, leave it be
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class PredictorWorker:
    """The model actor's body: builds and checks every model once, then runs batches.

    A model that cannot be built is kept as the error ``ready`` raises, so the driver reports it
    in one line (naming the model) before any tile is read.
    """

    def __init__(self, config: Config, num_threads: int) -> None:
        passive_openmp()
        keep_freed_pages()
        from geoseg.models.infer import Predictor  # torch lives in the actors, not in the driver

        self.error: GeosegError | None = None
        self.predictor: Any = None
        try:
            self.predictor = Predictor(config, num_threads=num_threads)
        except GeosegError as exc:
            self.error = exc

    def ready(self) -> str:
        """The device the models run on and their number format (``cpu bf16``); raises the model
        error if building failed."""
        if self.error is not None:
            raise self.error
        return f"{self.predictor.device} {self.predictor.precision}"

    def predict_scenes(self, *refs: Any) -> Any:
        """The model outputs of the batches of one or more scenes: ``refs`` holds each batch's
        payloads, then each scene's ``BlendPlan`` (or None); their windows share model calls. One
        list of results per batch (``ray_returns``)."""
        n = len(refs) // 2
        results = self.predictor.predict_scenes(list(zip(refs[:n], refs[n:])))
        release_freed_pages()
        return ray_returns(results)
