"""Files a scene produces: COG masks, GeoPackage layers and summaries, each written atomically.

Everything for a scene is written into a hidden temporary folder next to the output and moved
into ``out/<stem>/`` only when complete, so a failed scene leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
import shapely
from affine import Affine
from pyogrio.raw import write as ogr_write
from pyproj import CRS, Transformer
from rasterio.windows import Window

from geoseg.config import ModelConfig
from geoseg.units import GroundScale, local_metric_crs
from geoseg.vectorize import pixel_to_crs, to_multipolygon

SEMANTIC_NODATA = 255
# Windows for passes over a whole raster: bounded memory whatever the raster size.
PASS_WINDOW = 2048
_GTIFF = dict(driver="GTiff", tiled=True, blockxsize=512, blockysize=512, compress="deflate", BIGTIFF="IF_SAFER")
_PALETTE = ["#1f78b4", "#33a02c", "#ffff99", "#e31a1c", "#b15928", "#a6cee3", "#b2df8a", "#fb9a99", "#fdbf6f", "#cab2d6"]


def class_colors(spec: ModelConfig) -> list[str]:
    """Colour per class: the configured ones, else a fixed palette."""
    return list(spec.colors) if spec.colors else [_PALETTE[i % len(_PALETTE)] for i in range(len(spec.classes))]


def _rgb(hex_color: str) -> tuple[int, int, int, int]:
    h = hex_color.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16), 255


class MaskWriter:
    """One mask GeoTIFF on the scene's grid, written window by window by the driver alone."""

    def __init__(self, path: Path, profile: dict[str, Any], spec: ModelConfig, name: str) -> None:
        self.path, self.spec, self.name = path, spec, name
        semantic = spec.task == "semantic"
        self.dtype = "uint8" if semantic else "uint32"
        self.nodata = SEMANTIC_NODATA if semantic else 0
        self.profile = {**profile, **_GTIFF, "count": 1, "dtype": self.dtype, "nodata": self.nodata}
        self.ds = rasterio.open(self.raw_path, "w", **self.profile)

    @property
    def raw_path(self) -> Path:
        return self.path.with_name(self.path.stem + ".raw.tif")

    def write(self, window: Window, array: np.ndarray) -> None:
        self.ds.write(array.astype(self.dtype, copy=False), 1, window=window)

    def fill(self, window: Window) -> None:
        """Mark a window as having no result (all-nodata tile)."""
        self.write(window, np.full((int(window.height), int(window.width)), self.nodata, dtype=self.dtype))

    def finish(self, lut: np.ndarray | None = None) -> None:
        """Close, relabel provisional instance ids through ``lut`` (windowed), write the COG."""
        self.ds.close()
        src = self.raw_path
        if lut is not None:
            src = self.path.with_name(self.path.stem + ".ids.tif")
            with rasterio.open(self.raw_path) as raw, rasterio.open(src, "w", **self.profile) as dst:
                for window in _pass_windows(raw.width, raw.height):
                    dst.write(lut[raw.read(1, window=window)], 1, window=window)
            self.raw_path.unlink()
        self._decorate(src)
        rasterio.shutil.copy(src, self.path, driver="COG", compress="DEFLATE", blocksize=512,
                             overview_resampling="NEAREST", num_threads="ALL_CPUS", BIGTIFF="IF_SAFER")
        src.unlink()

    def _decorate(self, path: Path) -> None:
        with rasterio.open(path, "r+") as ds:
            ds.update_tags(geoseg_model=self.name, geoseg_task=self.spec.task,
                           geoseg_classes=json.dumps(self.spec.classes))
            if self.spec.task == "semantic":
                ds.write_colormap(1, {i: _rgb(c) for i, c in enumerate(class_colors(self.spec))})
                ds.update_tags(1, **{f"class_{i}": c for i, c in enumerate(self.spec.classes)})
            ds.set_band_description(1, f"{self.name} ({'class index' if self.spec.task == 'semantic' else 'instance id, 0 = none'})")

    def abort(self) -> None:
        if not self.ds.closed:
            self.ds.close()


def _pass_windows(width: int, height: int) -> list[Window]:
    return [Window(c, r, min(PASS_WINDOW, width - c), min(PASS_WINDOW, height - r))
            for r in range(0, height, PASS_WINDOW) for c in range(0, width, PASS_WINDOW)]


class LayerWriter:
    """A GeoPackage layer of MultiPolygons, appended in batches (with GPKG's R-tree index)."""

    FLUSH_ROWS = 5000

    def __init__(self, path: Path, layer: str, crs_wkt: str, fields: dict[str, str]) -> None:
        self.path, self.layer, self.crs_wkt, self.fields = path, layer, crs_wkt, fields
        self.rows: dict[str, list[Any]] = {k: [] for k in fields}
        self.geoms: list[bytes] = []
        self.created = False

    def add(self, geom: shapely.Geometry, **values: Any) -> None:
        self.geoms.append(shapely.to_wkb(to_multipolygon(geom)))
        for k in self.fields:
            self.rows[k].append(values[k])
        if len(self.geoms) >= self.FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.created and not self.geoms:
            return
        data = [np.asarray(self.rows[k], dtype=object if t == "str" else t) for k, t in self.fields.items()]
        ogr_write(str(self.path), np.asarray(self.geoms, dtype=object), field_data=data, fields=list(self.fields),
                  layer=self.layer, driver="GPKG", crs=self.crs_wkt, geometry_type="MultiPolygon",
                  append=self.created, promote_to_multi=True)
        self.created = True
        self.geoms.clear()
        for v in self.rows.values():
            v.clear()


SEMANTIC_FIELDS = {"class": "str", "area_m2": "float64"}
INSTANCE_FIELDS = {"instance_id": "int64", "class": "str", "score": "float64", "area_m2": "float64",
                   "length_m": "float64", "width_m": "float64", "orientation_deg": "float64"}


class ObjectSink:
    """Receives each final object or region once: filters, numbers, measures, writes, counts."""

    def __init__(self, spec: ModelConfig, layer: LayerWriter, transform: Affine, crs_wkt: str,
                 bounds: tuple[float, float, float, float], scale: GroundScale) -> None:
        self.spec, self.layer, self.transform = spec, layer, transform
        self.instance = spec.task == "instance"
        pixel_m = math.hypot(transform.a, transform.d) * scale.metres_per_unit
        self.simplify_px = spec.simplify_m / pixel_m if pixel_m > 0 else 0.0
        metric = local_metric_crs(crs_wkt, bounds)
        self.to_metric = Transformer.from_crs(CRS.from_wkt(crs_wkt), metric, always_xy=True) if metric else None
        self.count = np.zeros(len(spec.classes), dtype=np.int64)
        self.pixels = np.zeros(len(spec.classes), dtype=np.int64)
        self.area = np.zeros(len(spec.classes), dtype=np.float64)
        self.next_id = 1

    def __call__(self, cls: int, pixels: int, area_m2: float, score_sum: float, geom: shapely.Geometry) -> int:
        if self.instance and area_m2 < self.spec.min_area_m2:
            return 0
        if self.simplify_px > 0:
            geom = shapely.simplify(geom, self.simplify_px, preserve_topology=True)
        geom = pixel_to_crs(geom, self.transform)
        self.count[cls] += 1
        self.pixels[cls] += pixels
        self.area[cls] += area_m2
        if not self.instance:
            self.layer.add(geom, **{"class": self.spec.classes[cls], "area_m2": area_m2})
            return 0
        oid, self.next_id = self.next_id, self.next_id + 1
        length, width, orientation = self._rectangle(geom)
        self.layer.add(geom, instance_id=oid, score=score_sum / max(pixels, 1), area_m2=area_m2,
                       length_m=length, width_m=width, orientation_deg=orientation, **{"class": self.spec.classes[cls]})
        return oid

    def _rectangle(self, geom: shapely.Geometry) -> tuple[float, float, float]:
        """Length, width (m) and orientation (degrees clockwise from north, 0-180) of the long side."""
        if self.to_metric is not None:
            geom = shapely.transform(geom, lambda xy: np.column_stack(self.to_metric.transform(xy[:, 0], xy[:, 1])))
        rect = shapely.oriented_envelope(geom)
        xy = shapely.get_coordinates(rect)
        if xy.shape[0] < 4:
            return 0.0, 0.0, 0.0
        e1, e2 = xy[1] - xy[0], xy[2] - xy[1]
        long_edge, short_edge = (e1, e2) if np.hypot(*e1) >= np.hypot(*e2) else (e2, e1)
        azimuth = math.degrees(math.atan2(long_edge[0], long_edge[1])) % 180.0
        return float(np.hypot(*long_edge)), float(np.hypot(*short_edge)), azimuth


def write_counts_table(path: Path, rows: list[dict[str, Any]]) -> None:
    """Non-spatial ``counts`` table in the GeoPackage: one row per model x class."""
    fields = ["model", "task", "class", "count", "pixels", "area_m2"]
    types = [object, object, object, np.int64, np.int64, np.float64]
    data = [np.asarray([r[f] if r[f] is not None else -1 for r in rows], dtype=t) for f, t in zip(fields, types)]
    ogr_write(str(path), None, field_data=data, fields=fields, layer="counts", driver="GPKG", geometry_type=None)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON under a temporary name, then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def publish_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a completed scene folder into place, replacing an earlier run's."""
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
