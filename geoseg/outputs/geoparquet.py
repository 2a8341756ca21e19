"""GeoParquet copies of a scene's GeoPackage layers (``output.vectors: [gpkg, parquet]``).

Each model's layer becomes ``<stem>_<model>.parquet``: GeoParquet 1.1, the same features in the
same order with the same attributes, geometry as WKB in column ``geometry`` (CRS as PROJJSON in the
``geo`` metadata) and a ``bbox`` covering column (struct ``xmin, ymin, xmax, ymax``) so that readers
can skip row groups by extent. The layer is streamed in Arrow batches, one row group each, so
memory stays bounded whatever the number of features.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pyogrio
import shapely
from pyproj import CRS

GEOPARQUET_VERSION = "1.1.0"
BATCH_ROWS = 65536  # features per Arrow batch and Parquet row group
_BBOX = pa.struct([(k, pa.float64()) for k in ("xmin", "ymin", "xmax", "ymax")])


def write_vector_formats(gpkg: Path, layers: Iterable[str], formats: Iterable[str]) -> list[Path]:
    """Write the formats a config asks for from the finished GeoPackage: a GeoParquet file per layer
    for ``parquet``; the GeoPackage itself is removed when ``gpkg`` is not asked for. Returns the
    Parquet files."""
    formats = list(formats)
    written = []
    if "parquet" in formats:
        for layer in layers:
            written.append(write_geoparquet(gpkg, layer, gpkg.with_name(f"{gpkg.stem}_{layer}.parquet")))
    if "gpkg" not in formats:
        gpkg.unlink()
    return written


def write_geoparquet(gpkg: Path, layer: str, dest: Path, batch_rows: int = BATCH_ROWS) -> Path:
    """One GeoPackage layer as a GeoParquet 1.1 file with a bbox covering column."""
    info = pyogrio.read_info(gpkg, layer=layer, force_total_bounds=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with pyogrio.open_arrow(gpkg, layer=layer, use_pyarrow=True, batch_size=batch_rows) as (meta, reader):
        geom_name = meta["geometry_name"] or "geom"
        fields = [f for f in reader.schema if f.name != geom_name]
        schema = pa.schema(
            [*fields, pa.field("geometry", pa.binary()), pa.field("bbox", _BBOX)],
            metadata={"geo": json.dumps(_geo_metadata(meta, info))},
        )
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for batch in reader:
                writer.write_table(_convert(batch, geom_name, schema), row_group_size=batch_rows)
    os.replace(tmp, dest)
    return dest


def _convert(batch: pa.RecordBatch, geom_name: str, schema: pa.Schema) -> pa.Table:
    wkb = batch.column(geom_name)
    geoms = shapely.from_wkb(wkb.to_numpy(zero_copy_only=False))
    bounds = shapely.bounds(geoms)  # NaN for a missing or empty geometry
    bbox = pa.StructArray.from_arrays([pa.array(bounds[:, i], from_pandas=True) for i in range(4)], fields=list(_BBOX))
    columns = [batch.column(f.name) for f in schema if f.name not in ("geometry", "bbox")]
    return pa.Table.from_arrays([*columns, wkb.cast(pa.binary()), bbox], schema=schema)


def _geo_metadata(meta: dict, info: dict) -> dict:
    """The ``geo`` file metadata of GeoParquet 1.1 for one WKB column with its bbox covering."""
    kind = meta["geometry_type"]
    column: dict = {"encoding": "WKB", "geometry_types": [kind] if kind and kind != "Unknown" else []}
    if meta["crs"]:
        column["crs"] = CRS.from_user_input(meta["crs"]).to_json_dict()
    bounds = info.get("total_bounds")
    if info.get("features") and bounds is not None and all(math.isfinite(v) for v in bounds):
        column["bbox"] = [float(v) for v in bounds]
    column["covering"] = {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}
    return {"version": GEOPARQUET_VERSION, "primary_column": "geometry", "columns": {"geometry": column}}
