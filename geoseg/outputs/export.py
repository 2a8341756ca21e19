"""Files a scene produces: COG masks, GeoPackage layers and summaries, each written atomically.

Everything for a scene is written into a hidden temporary folder next to the output and moved
into ``out/<stem>/`` only when complete, so a failed scene leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
import shapely
from affine import Affine
from pyogrio.raw import write as ogr_write
from rasterio.windows import Window

from geoseg.core.config import SEMANTIC_NODATA
from geoseg.core.heads import ModelConfig
from geoseg.core.units import GroundScale, ground_frames
from geoseg.outputs.styles import class_colors, hex_rgb
from geoseg.raster.vectorize import pixel_to_crs, to_multipolygons

# Windows for passes over a whole raster: bounded memory whatever the raster size.
PASS_WINDOW = 2048
# Intermediate rasters (written window by window, read once for the COG): ZSTD level 1 wrote a
# class mask 35x faster than deflate here; the published COG is deflate, which every reader opens.
_GTIFF = dict(driver="GTiff", tiled=True, compress="zstd", zstd_level=1, BIGTIFF="IF_SAFER")
BLOCK = 512  # tile side of the masks (COG), smaller for small masks: ``block_size``


def block_size(width: int, height: int) -> int:
    """Tiles of ``BLOCK`` px, or for a mask smaller than one, the power of two that holds it (at
    least 16, as GeoTIFF tiles must be): every tile is compressed whole, so a 64^2 mask in one
    512^2 tile compressed 64x the pixels (its COG copy took 6.2 ms, 2.8 ms with 64^2 tiles)."""
    side = max(width, height, 16)
    return min(BLOCK, 1 << (side - 1).bit_length())


class MaskWriter:
    """One mask GeoTIFF on the scene's grid, written window by window by the driver alone.

    A mask of one tile (at most ``BLOCK``^2: 1 MB of instance ids, whatever the scene count) is
    kept in memory and written as the COG once, from a GDAL in-memory dataset; a larger one goes
    through a temporary GeoTIFF window by window. For a 64^2 instance mask that took 2.1 ms
    instead of 4.5-5 (two temporary files created, written, read and removed)."""

    def __init__(self, path: Path, profile: dict[str, Any], spec: ModelConfig, name: str) -> None:
        self.path, self.spec, self.name = path, spec, name
        semantic = spec.task == "semantic"
        self.dtype = "uint8" if semantic else "uint32"
        self.nodata = SEMANTIC_NODATA if semantic else 0
        width, height = int(profile["width"]), int(profile["height"])
        self.block = block_size(width, height)
        self.profile = {**profile, "count": 1, "dtype": self.dtype, "nodata": self.nodata}
        # GDAL's threads for the COG pay off on large masks only (a 64^2 mask's copy: 3.0 ms with
        # them, 2.4 ms without).
        self.cog_threads = "ALL_CPUS" if width * height > PASS_WINDOW**2 else 1
        self.array: np.ndarray | None = None
        self.values: np.ndarray | None = None  # the published values of a mask kept in memory
        self.ds: Any = None
        if width * height <= BLOCK * BLOCK:
            self.array = np.full((height, width), self.nodata, dtype=self.dtype)
        else:
            self.ds = self._create(self.raw_path)

    def _create(self, path: Path | None) -> Any:
        """A new GeoTIFF on the scene's grid (``path`` None: a GDAL in-memory dataset), described
        as the published mask is (the COG copies tags, colours and band description)."""
        if path is None:
            ds = rasterio.open("", "w", driver="MEM", **{k: v for k, v in self.profile.items() if k != "driver"})
        else:
            ds = rasterio.open(
                path, "w", **{**self.profile, **_GTIFF, "blockxsize": self.block, "blockysize": self.block}
            )
        ds.update_tags(geoseg_model=self.name, geoseg_task=self.spec.task, geoseg_classes=json.dumps(self.spec.classes))
        if self.spec.task == "semantic":
            ds.write_colormap(1, {i: (*hex_rgb(c), 255) for i, c in enumerate(class_colors(self.spec))})
            ds.update_tags(1, **{f"class_{i}": c for i, c in enumerate(self.spec.classes)})
        ds.set_band_description(
            1, f"{self.name} ({'class index' if self.spec.task == 'semantic' else 'instance id, 0 = none'})"
        )
        return ds

    @property
    def raw_path(self) -> Path:
        return self.path.with_name(self.path.stem + ".raw.tif")

    def write(self, window: Window, array: np.ndarray) -> None:
        if self.array is not None:
            r, c = int(window.row_off), int(window.col_off)
            self.array[r : r + int(window.height), c : c + int(window.width)] = array
        else:
            self.ds.write(array.astype(self.dtype, copy=False), 1, window=window)

    def fill(self, window: Window) -> None:
        """Mark a window as having no result (all-nodata tile)."""
        self.write(window, np.full((int(window.height), int(window.width)), self.nodata, dtype=self.dtype))

    def finish(self, lut: np.ndarray | None = None) -> None:
        """Relabel provisional instance ids through ``lut`` (windowed), write the COG."""
        if self.array is not None:
            self.values = self.array if lut is None else lut[self.array]
            self.array = None  # (the provisional ids are not needed once relabelled)
            with self._create(None) as mem:
                mem.write(self.values, 1)
                self._cog(mem)
            return
        self.ds.close()
        src = self.raw_path
        if lut is not None:
            src = self.path.with_name(self.path.stem + ".ids.tif")
            with rasterio.open(self.raw_path) as raw, self._create(src) as dst:
                for window in _pass_windows(raw.width, raw.height):
                    dst.write(lut[raw.read(1, window=window)], 1, window=window)
            self.raw_path.unlink()
        self._cog(src)
        src.unlink()

    def _cog(self, src: Any) -> None:
        rasterio.shutil.copy(
            src,
            self.path,
            driver="COG",
            compress="DEFLATE",
            blocksize=self.block,
            overview_resampling="NEAREST",
            num_threads=self.cog_threads,
            BIGTIFF="IF_SAFER",
        )

    def abort(self) -> None:
        if self.ds is not None and not self.ds.closed:
            self.ds.close()


def _pass_windows(width: int, height: int) -> list[Window]:
    return [
        Window(c, r, min(PASS_WINDOW, width - c), min(PASS_WINDOW, height - r))
        for r in range(0, height, PASS_WINDOW)
        for c in range(0, width, PASS_WINDOW)
    ]


class LayerWriter:
    """A GeoPackage layer of MultiPolygons, appended in batches (with GPKG's R-tree index): created
    through GDAL, then appended through sqlite3 (``append_features``)."""

    FLUSH_ROWS = 5000

    def __init__(self, path: Path, layer: str, crs_wkt: str, fields: dict[str, str], exists: bool = False) -> None:
        """``exists``: the layer is in the GeoPackage already (``geoseg.outputs.gpkg_template``)."""
        self.path, self.layer, self.crs_wkt, self.fields = path, layer, crs_wkt, fields
        self.rows: dict[str, list[Any]] = {k: [] for k in fields}
        self.geoms: list[bytes] = []
        self.bounds: list[np.ndarray] = []  # per batch of add_many: minx, miny, maxx, maxy of each geometry
        self.created = exists

    def add(self, geom: shapely.Geometry, **values: Any) -> None:
        """Add one feature; ``values`` holds every field."""
        self.add_many(np.array([geom], dtype=object), **{k: [v] for k, v in values.items()})

    def add_many(self, geoms: np.ndarray, **columns: Any) -> None:
        """Add features from an array of geometries and one sequence per field."""
        multis = to_multipolygons(geoms)
        self.geoms.extend(shapely.to_wkb(multis).tolist())
        self.bounds.append(shapely.bounds(multis))
        for k in self.fields:
            self.rows[k].extend(list(columns[k]))
        if len(self.geoms) >= self.FLUSH_ROWS:
            self.flush()

    def flush(self, db: sqlite3.Connection | None = None) -> None:
        """Write the features added since the last flush; ``db``: the GeoPackage open already
        (``open_gpkg``), for several layers in one transaction."""
        if self.created and not self.geoms:
            return
        if self.created:
            with contextlib.nullcontext(db) if db is not None else open_gpkg(self.path) as conn:
                append_features(conn, self.layer, self.geoms, np.concatenate(self.bounds), self.rows)
        else:
            self._create()
        self.created = True
        self.geoms.clear()
        self.bounds.clear()
        for v in self.rows.values():
            v.clear()

    def _create(self) -> None:
        data = [np.asarray(self.rows[k], dtype=object if t == "str" else t) for k, t in self.fields.items()]
        ogr_write(
            str(self.path),
            np.asarray(self.geoms, dtype=object),
            field_data=data,
            fields=list(self.fields),
            layer=self.layer,
            driver="GPKG",
            crs=self.crs_wkt,
            geometry_type="MultiPolygon",
            promote_to_multi=True,
        )


# GeoPackage geometry header (GeoPackage 1.2, 2.1.3): "GP", version 0, flags, srs_id, envelope. Flags:
# little-endian (bit 0), envelope [minx, maxx, miny, maxy] (bits 1-3 = 1); an empty geometry has
# bit 4 set and no envelope.
_GPKG_HEADER = struct.Struct("<2sBBi4d")
_GPKG_EMPTY_HEADER = struct.Struct("<2sBBi")
_GPKG_FLAGS, _GPKG_EMPTY_FLAGS = 0b0000_0011, 0b0001_0001


def _gpkg_envelope(blob: bytes | None, i: int) -> float | None:
    """Coordinate ``i`` (minx, maxx, miny, maxy) of a GeoPackage geometry's envelope."""
    if blob is None or blob[3] & 0b0001_0000:
        return None
    return float(_GPKG_HEADER.unpack_from(blob)[4 + i])


def _gpkg_is_empty(blob: bytes | None) -> int | None:
    return None if blob is None else int(bool(blob[3] & 0b0001_0000))


@contextlib.contextmanager
def open_gpkg(path: Path) -> Iterator[sqlite3.Connection]:
    """A GeoPackage that GDAL wrote, open through sqlite3 for appending rows in one transaction
    (committed on leaving): opening it with GDAL cost 2.5 ms of CPU per layer and scene, more than
    the rows of a small scene. The layers' own triggers keep their R-tree indexes and feature
    counts; they call the ``ST_`` functions GDAL gives SQLite, defined here on the envelope each
    geometry carries."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        # A staging file, as for GDAL (geoseg.runner.writer, geoseg.outputs.gpkg_template): a
        # crash never leaves it where users look, so neither a journal on disk nor syncs protect anything.
        db.execute("PRAGMA journal_mode=MEMORY")
        db.execute("PRAGMA synchronous=OFF")
        for i, name in enumerate(("ST_MinX", "ST_MaxX", "ST_MinY", "ST_MaxY")):
            db.create_function(name, 1, lambda blob, i=i: _gpkg_envelope(blob, i), deterministic=True)
        db.create_function("ST_IsEmpty", 1, _gpkg_is_empty, deterministic=True)
        yield db


def append_features(
    db: sqlite3.Connection, layer: str, wkbs: list[bytes], bounds: np.ndarray, rows: dict[str, list[Any]]
) -> None:
    """Append features (ISO WKB, their bounds as shapely gives them, one list per field) to a
    GeoPackage layer that GDAL created (``db``: ``open_gpkg``); the layer's extent and change
    time in ``gpkg_contents`` are updated as GDAL updates them."""
    fields = list(rows)
    insert = 'INSERT INTO "{}" ("geom", {}) VALUES (?, {})'.format(
        layer, ", ".join(f'"{f}"' for f in fields), ", ".join("?" * len(fields))
    )
    columns = [np.asarray(rows[f]).tolist() for f in fields]  # numpy scalars -> Python values for sqlite3
    (srs_id,) = db.execute(
        "SELECT srs_id FROM gpkg_geometry_columns WHERE lower(table_name) = lower(?)", (layer,)
    ).fetchone()
    blobs = []
    for wkb, (minx, miny, maxx, maxy) in zip(wkbs, bounds.tolist()):
        if math.isnan(minx):
            blobs.append(_GPKG_EMPTY_HEADER.pack(b"GP", 0, _GPKG_EMPTY_FLAGS, srs_id) + wkb)
        else:
            blobs.append(_GPKG_HEADER.pack(b"GP", 0, _GPKG_FLAGS, srs_id, minx, maxx, miny, maxy) + wkb)
    db.executemany(insert, zip(blobs, *columns))
    finite = bounds[~np.isnan(bounds[:, 0])]
    if len(finite):
        db.execute(
            "UPDATE gpkg_contents SET min_x = min(coalesce(min_x, ?1), ?1), min_y = min(coalesce(min_y, ?2), ?2),"
            " max_x = max(coalesce(max_x, ?3), ?3), max_y = max(coalesce(max_y, ?4), ?4),"
            " last_change = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE lower(table_name) = lower(?5)",
            (*(float(v) for v in (*finite[:, :2].min(axis=0), *finite[:, 2:].max(axis=0))), layer),
        )


SEMANTIC_FIELDS = {"class": "str", "area_m2": "float64"}
INSTANCE_FIELDS = {
    "instance_id": "int64",
    "class": "str",
    "score": "float64",
    "area_m2": "float64",
    "length_m": "float64",
    "width_m": "float64",
    "orientation_deg": "float64",
}


class ObjectSink:
    """Receives each final object or region once: filters, numbers, measures, writes, counts."""

    def __init__(
        self,
        spec: ModelConfig,
        layer: LayerWriter,
        transform: Affine,
        crs_wkt: str,
        bounds: tuple[float, float, float, float],
        scale: GroundScale,
    ) -> None:
        # (bounds: no longer used, measures are taken around each object's own centroid)
        self.spec, self.layer, self.transform = spec, layer, transform
        self.instance = spec.task == "instance"
        pixel_m = math.hypot(transform.a, transform.d) * scale.metres_per_unit
        self.simplify_px = spec.simplify_m / pixel_m if pixel_m > 0 else 0.0
        self.crs_wkt = crs_wkt
        self.count = np.zeros(len(spec.classes), dtype=np.int64)
        self.pixels = np.zeros(len(spec.classes), dtype=np.int64)
        self.area = np.zeros(len(spec.classes), dtype=np.float64)
        self.next_id = 1

    def __call__(
        self, cls: np.ndarray, pixels: np.ndarray, area_m2: np.ndarray, score_sum: np.ndarray, geoms: np.ndarray
    ) -> np.ndarray:
        """Take a batch of final objects (arrays, one entry each); returns their ids (0: dropped)."""
        ids = np.zeros(len(geoms), dtype=np.int64)
        keep = area_m2 >= self.spec.min_area_m2 if self.instance else np.ones(len(geoms), dtype=bool)
        if not keep.any():
            return ids
        cls, pixels, area_m2, score_sum, geoms = cls[keep], pixels[keep], area_m2[keep], score_sum[keep], geoms[keep]
        if self.simplify_px > 0:
            geoms = shapely.simplify(geoms, self.simplify_px, preserve_topology=True)
        geoms = pixel_to_crs(geoms, self.transform)
        np.add.at(self.count, cls, 1)
        np.add.at(self.pixels, cls, pixels)
        np.add.at(self.area, cls, area_m2)
        names = np.asarray(self.spec.classes, dtype=object)[cls]
        if not self.instance:
            self.layer.add_many(geoms, **{"class": names, "area_m2": area_m2})
            return ids
        oids = np.arange(self.next_id, self.next_id + len(geoms))
        self.next_id += len(geoms)
        ids[keep] = oids
        length, width, orientation = self._rectangles(geoms)
        self.layer.add_many(
            geoms,
            instance_id=oids,
            score=score_sum / np.maximum(pixels, 1),
            area_m2=area_m2,
            length_m=length,
            width_m=width,
            orientation_deg=orientation,
            **{"class": names},
        )
        return ids

    def _rectangles(self, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Length, width (m) and orientation (degrees clockwise from true north, 0-180) of the long
        side of each geometry's minimum rotated rectangle, on the ground: each geometry is first
        mapped to metres east and north around its centroid (``geoseg.core.units.ground_frames``)."""
        centre = shapely.get_coordinates(shapely.centroid(geoms))
        frames = ground_frames(self.crs_wkt, centre[:, 0], centre[:, 1])
        coords, index = shapely.get_coordinates(geoms, return_index=True)
        local = np.einsum("nij,nj->ni", frames[index], coords - centre[index])
        geoms = shapely.transform(geoms, lambda xy: local)  # (same coordinate order as get_coordinates)
        rects = shapely.oriented_envelope(geoms)
        xy, index = shapely.get_coordinates(rects, return_index=True)
        starts = np.searchsorted(index, np.arange(len(geoms)))
        counts = np.bincount(index, minlength=len(geoms))
        ok = counts >= 4  # a polygon ring; degenerate shapes give a line or a point
        first = np.where(ok, starts, 0)
        e1 = xy[np.minimum(first + 1, len(xy) - 1)] - xy[first]
        e2 = xy[np.minimum(first + 2, len(xy) - 1)] - xy[np.minimum(first + 1, len(xy) - 1)]
        n1, n2 = np.hypot(e1[:, 0], e1[:, 1]), np.hypot(e2[:, 0], e2[:, 1])
        long_edge = np.where((n1 >= n2)[:, None], e1, e2)
        azimuth = np.degrees(np.arctan2(long_edge[:, 0], long_edge[:, 1])) % 180.0
        zero = np.zeros(len(geoms))
        return (
            np.where(ok, np.maximum(n1, n2), zero),
            np.where(ok, np.minimum(n1, n2), zero),
            np.where(ok, azimuth, zero),
        )


COUNTS_FIELDS = ["model", "task", "class", "count", "pixels", "area_m2"]
_COUNTS_INSERT = "INSERT INTO counts ({}) VALUES ({})".format(
    ", ".join(f'"{f}"' for f in COUNTS_FIELDS), ", ".join("?" * len(COUNTS_FIELDS))
)


def write_counts_table(
    path: Path, rows: list[dict[str, Any]], append: bool = False, db: sqlite3.Connection | None = None
) -> None:
    """Non-spatial ``counts`` table in the GeoPackage: one row per model x class (``append``: into
    the table there already, through sqlite3; ``db``: the GeoPackage open already, ``open_gpkg``).
    A semantic class has no count: -1."""
    values = [[r[f] if r[f] is not None else -1 for f in COUNTS_FIELDS] for r in rows]
    if append:
        with contextlib.nullcontext(db) if db is not None else open_gpkg(path) as conn:
            conn.executemany(_COUNTS_INSERT, values)
        return
    types = [object, object, object, np.int64, np.int64, np.float64]
    data = [np.asarray([v[i] for v in values], dtype=t) for i, t in enumerate(types)]
    ogr_write(
        str(path),
        None,
        field_data=data,
        fields=COUNTS_FIELDS,
        layer="counts",
        driver="GPKG",
        geometry_type=None,
        append=append,
    )
