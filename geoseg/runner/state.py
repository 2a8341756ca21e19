"""The driver's view of a run while it is scheduled: each scene's tiles still to send and its
counters (``Scene``), the batches in flight (``Batch``), and the place of each model actor (``Slot``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from geoseg.core.config import Config
from geoseg.core.units import GroundScale
from geoseg.raster.grid import Tile, plan_tiles, tile_grid_shape
from geoseg.raster.read import SceneInfo
from geoseg.raster.windows import BlendPlan, blend_plan


class Scene:
    """The driver's view of one scene: its tiles still to send, counters, its writer and error.
    A scene whose writer died starts again from its first tile (a new ``attempt``)."""

    blend: BlendPlan | None  # set by reset() and open_blend()

    def __init__(self, index: int, info: SceneInfo, config: Config, run_id: str = "") -> None:
        self.index, self.info, self.run_id = index, info, run_id
        self.config = config
        self.tile_size, self.halo = config.tiling.tile_size, config.tiling.halo
        self.grid_shape = tile_grid_shape(info.width, info.height, self.tile_size)
        self.n_tiles = self.grid_shape[0] * self.grid_shape[1]
        self.scale: GroundScale | None = None  # computed when first opened
        self.pixel_areas: Any = None  # ref of the scene's PixelAreas (small), shared by its tasks
        self.error: str | None = None
        self.closed = False  # published, or failed and reported
        self.attempt = 0
        self.reset()

    def open_blend(self) -> None:
        """Make the scene's window grids for this attempt; their key names its windows in the model
        actors' caches."""
        self.blend = blend_plan(self.config, self.info, f"{self.run_id}/{self.index}/{self.attempt}")

    def _tiles(self) -> Iterator[Tile]:
        """The scene's tiles, each with the context its windows need (drawn after the scene opened)."""
        for tile in plan_tiles(self.info.width, self.info.height, self.tile_size, self.halo, scene=self.index):
            yield tile if self.blend is None else dataclasses.replace(tile, context=self.blend.context(tile.read))

    def reset(self) -> None:
        """(Re)start from the first tile, on no writer yet."""
        self.attempt += 1
        # The scene's window grids (None: each tile is one window), made when the scene opens, and
        # their ref in the object store.
        self.blend = None
        self.blend_ref: Any = None
        self.tiles: Iterator[Tile] = self._tiles()
        self.writer: int | None = None  # index in the writer pool
        self.writer_actor: Any = None  # the writer itself (a replacement may take its index later)
        self.opened: Any = None  # ref of the writer's open(): later calls wait for it
        self.sent = self.acked = self.in_flight = 0
        self.pixels = 0  # core pixels acknowledged in this attempt
        self.finishing = False


@dataclass(eq=False)
class Batch:
    """Tiles of one scene that go together: read task -> model actor call -> post-processing task
    -> the scene's writer."""

    scene: Scene
    tiles: list[Tile]
    attempt: int  # the scene's attempt it belongs to: one of an earlier attempt no longer counts
    deaths: int = 0  # model actor deaths while it was in flight
    lost: int = 0  # other system failures (its data lost with a node, ...)
    solo: bool = False  # runs alone on its actor (it was in flight at two of its deaths)
    slot: int = -1
    actor: Any = None  # the model actor it went to
    writer: Any = None  # the writer it went to


@dataclass(eq=False)
class Slot:
    """The place of one model actor: the actor now in it and its state."""

    actor: Any
    node: str | None  # the node it is pinned to (CPU actors); None: placed by Ray (GPU actors)
    state: str = "ready"  # starting | ready | gone (dead and not replaced)
    load: int = 0  # batches queued on it
    solo: bool = False  # a suspect batch runs on it, alone
    start_failures: int = 0  # deaths while starting, in a row
