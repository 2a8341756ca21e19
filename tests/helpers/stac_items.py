"""STAC Items for tests, written with pystac over band files (one GeoTIFF per band, as the sen2ships
files are): one asset per band with STAC 1.0 ``eo:bands`` (name, common name) and ``raster:bands``."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pystac
import rasterio
import rasterio.warp

COMMON = {"B02": "blue", "B03": "green", "B04": "red", "B08": "nir", "B11": "swir16"}
ACQUIRED = datetime(2023, 7, 30, 10, 56, tzinfo=timezone.utc)


def band_item(
    folder: Path,
    item_id: str,
    files: dict[str, Path],
    scale: float = 0.0001,
    offset: float = 0.0,
    when: datetime = ACQUIRED,
) -> pystac.Item:
    """An Item with one asset per band file, its footprint the first file's bounds, its self href
    ``folder/<item_id>.json`` (not written: ``item.save_object()`` writes it)."""
    with rasterio.open(next(iter(files.values()))) as ds:
        bounds = rasterio.warp.transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    geometry = {
        "type": "Polygon",
        "coordinates": [
            [
                [bounds[0], bounds[1]],
                [bounds[2], bounds[1]],
                [bounds[2], bounds[3]],
                [bounds[0], bounds[3]],
                [bounds[0], bounds[1]],
            ]
        ],
    }
    item = pystac.Item(item_id, geometry, list(bounds), when, {})
    for band, path in files.items():
        item.add_asset(
            band,
            pystac.Asset(
                str(path),
                media_type=pystac.MediaType.GEOTIFF,
                roles=["data"],
                extra_fields={
                    "eo:bands": [{"name": band, "common_name": COMMON[band]}],
                    "raster:bands": [{"scale": scale, "offset": offset, "data_type": "uint16"}],
                },
            ),
        )
    item.set_self_href(str(folder / f"{item_id}.json"))
    return item
