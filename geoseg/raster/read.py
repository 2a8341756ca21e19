"""The only place pixels are read: scene inspection and windowed tile reads.

Outside the raster there is no context: the read window is clipped to the raster, and the
predictor pads the array (reflect) and marks the padding invalid, so it never reaches a count.
Validity comes from GDAL's mask (nodata value, alpha band or internal mask): ``read_masks``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import RasterioIOError

from geoseg.core.errors import InputError
from geoseg.core.s3 import gdal_path
from geoseg.raster.discover import output_name
from geoseg.raster.grid import Tile
from geoseg.raster.stac_input import ITEM_SEPARATOR, LINEAGE_PROPERTIES, item_vrt, load_item

# GeoTIFF metadata tag that ``geoseg synth`` writes (with ``GEOSEG_SYNTH_SEED``): the scene is synthetic.
SYNTHETIC_TAG = "GEOSEG_SYNTHETIC"


@dataclass(frozen=True)
class SceneInfo:
    """What the driver needs to know of a scene before any pixel is read."""

    path: str
    width: int
    height: int
    count: int
    dtype: str
    crs_wkt: str
    crs_string: str
    transform: Affine
    nodata: float | None
    name: str = ""  # output folder relative to --out (geoseg.raster.discover); the file's stem if not given
    fingerprint: dict[str, Any] | None = None  # size and mtime, or ETag (geoseg.outputs.records.input_fingerprint)
    synthetic: bool = False  # written by `geoseg synth` (its SYNTHETIC_TAG)
    warnings: tuple[str, ...] = ()  # for summary.json, set by the driver (e.g. models trained on other imagery)
    acquired: str | None = None  # acquisition time from the input's metadata, if any (acquisition_time)
    source: str | None = None  # what GDAL opens when not ``path``: a STAC Item's bands as VRT XML
    scale_offsets: dict[str, tuple[float, float]] | None = None  # per head, the input's own (scale, offset)
    derived_from: dict[str, Any] | None = None  # a STAC input: its href and the properties outputs copy

    @property
    def raster(self) -> str:
        """What GDAL opens to read the scene's pixels."""
        return self.source or self.path

    @property
    def stem(self) -> str:
        """Prefix of the scene's file names: the last part of its output folder."""
        return self.folder.rsplit("/", 1)[-1]

    @property
    def folder(self) -> str:
        """The scene's output folder relative to ``--out``."""
        return self.name or output_name(Path(self.path).name)


def inspect_scene(path: str, name: str = "") -> SceneInfo:
    """Open a scene's header and check it is a georeferenced raster; raise InputError otherwise.

    What each model needs of it (bands, dtype, resolution) is checked by ``geoseg.core.contract.check_scene``.
    """
    try:
        with rasterio.open(gdal_path(path)) as ds:
            if ds.crs is None:
                raise InputError(path, "raster has no CRS; assign one (e.g. gdal_edit.py -a_srs EPSG:32618)")
            if ds.transform.b != 0 or ds.transform.d != 0:
                raise InputError(path, "rotated geotransform is not supported; warp to a north-up grid first")
            return SceneInfo(
                path=path,
                width=ds.width,
                height=ds.height,
                count=ds.count,
                dtype=ds.dtypes[0],
                crs_wkt=ds.crs.to_wkt(),
                crs_string=ds.crs.to_string(),
                transform=ds.transform,
                nodata=ds.nodata,
                name=name,
                synthetic=is_synthetic(ds.tags()),
                acquired=acquisition_time(ds),
            )
    except RasterioIOError as exc:
        raise InputError(path, f"not a readable raster ({_short(exc)})") from None


def is_synthetic(tags: dict[str, str]) -> bool:
    """Whether a raster's metadata tags mark it as written by ``geoseg synth``."""
    return tags.get(SYNTHETIC_TAG) == "1"


def acquisition_time(ds: Any) -> str | None:
    """When the scene was acquired, as its metadata says: GDAL's ``IMAGERY`` domain (filled from
    vendor sidecar files) or a tag of that name; None when it does not say (not TIFFTAG_DATETIME,
    which is when the file was written)."""
    value = ds.tags(ns="IMAGERY").get("ACQUISITIONDATETIME") or ds.tags().get("ACQUISITIONDATETIME")
    return (str(value).strip() or None) if value else None


def read_tile(path: str, tile: Tile, bands: list[int]) -> dict[str, Any]:
    """Read ``bands`` over the tile's ``source`` window (its context, else its read window).

    Returns ``{"image": (C, h, w) raster dtype, "valid": (h, w) bool}``; ``valid`` is False where
    any read band is masked.
    """
    try:
        with rasterio.open(gdal_path(path)) as ds:
            image = ds.read(bands, window=tile.source)
            masks = ds.read_masks(bands, window=tile.source)
    except RasterioIOError as exc:
        raise InputError(
            path, f"read failed in window {_window_str(tile)}, the file may be damaged or truncated ({_short(exc)})"
        ) from None
    return {"image": image, "valid": np.all(masks > 0, axis=0)}


def _window_str(tile: Tile) -> str:
    w = tile.source
    return f"col {int(w.col_off)}, row {int(w.row_off)}, {int(w.width)}x{int(w.height)}"


def _short(exc: Exception) -> str:
    msg = str(exc).strip()
    # rasterio raises a generic "... See previous exception for details." chained to GDAL's error.
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause).strip() and (not msg or "See previous exception" in msg):
        msg = str(cause).strip()
    return msg.splitlines()[0][:200] if msg else type(exc).__name__


def stac_scene(path: str, name: str, config: Any) -> SceneInfo:
    """The ``SceneInfo`` of an Item input: its bands' VRT opened like a raster, named by ``path``."""
    item = load_item(path)
    vrt, scale_offsets = item_vrt(path, item, config)
    try:
        info = inspect_scene(vrt, name)
    except InputError as exc:
        raise InputError(path, exc.problem) from None
    acquired = item.datetime.isoformat() if item.datetime else None
    copied = {k: item.properties[k] for k in LINEAGE_PROPERTIES if k in item.properties}
    lineage = {"href": item.get_self_href() or path.partition(ITEM_SEPARATOR)[0], "id": item.id, "properties": copied}
    return replace(
        info, path=path, source=vrt, scale_offsets=scale_offsets or None, acquired=acquired, derived_from=lineage
    )
