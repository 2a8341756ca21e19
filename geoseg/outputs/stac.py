"""STAC metadata for the outputs: an Item per scene and a Collection per output folder (pystac).

- ``<name>/<stem>.stac.json``: a STAC Item written into the scene's staging folder just before it
  is published, so it is published (and listed in ``manifest.json``) with the files it describes.
  Geometry and bbox are the raster's footprint in EPSG:4326 (edges densified, so any CRS is
  right); the ``proj`` extension (v2.0.0) gives the grid (``proj:code`` or ``proj:wkt2``,
  ``proj:shape``, ``proj:transform``, ``proj:bbox``). One asset per file of a known kind found in
  the folder: the masks (COG; semantic masks list their classes with the ``classification``
  extension v2.0.0, value, name and colour; ``raster:bands`` give nodata and data type), the
  GeoPackage, GeoParquet files, ``summary.json``, a quicklook PNG, style sidecars.
- ``collection.json`` at the top of the output folder: a Collection linking the Item of every scene
  published there (this run's and earlier runs'), its extent the union of theirs. Rewritten at the
  end of each run through the ``OutputStore`` (atomic on disk, one PUT on S3).

Every link and asset href is relative (``./x_landuse.tif``, ``../collection.json``), and no
``self`` link is written: the output folder can be copied or uploaded as it is (a STAC
"self-contained" catalog). ``datetime`` is the input's acquisition time when its metadata carries
one (GDAL's ``IMAGERY`` domain ``ACQUISITIONDATETIME``), otherwise the time the scene was
processed; ``created`` is always the processing time.
"""

from __future__ import annotations

import logging
import os
import re
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import pystac
from pyproj import CRS
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.eo import EOExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension

import geoseg
from geoseg.core.config import SEMANTIC_NODATA, Config
from geoseg.core.heads import ModelConfig
from geoseg.core.storage import MANIFEST, OutputStore, write_json
from geoseg.outputs.styles import class_colors
from geoseg.raster.read import SceneInfo

log = logging.getLogger("geoseg")

ITEM_SUFFIX = ".stac.json"
COLLECTION_FILE = "collection.json"
PROCESSING_EXTENSION = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
PARQUET = "application/vnd.apache.parquet"  # IANA-registered; GeoParquet's recommended type
FOOTPRINT_POINTS = 21  # points per raster edge when the footprint is reprojected
_NAME_CHARS = re.compile(r"[^0-9A-Za-z_-]")  # classification v2.0.0 class names: ^[0-9A-Za-z-_]+$
_HEX = re.compile(r"^[0-9A-Fa-f]{6}$")
# Files of a scene folder that are not assets: the checkpoint stamp (still there when the item is
# written) and the completion marker (written after it).
_NOT_ASSETS = {"checkpoint.json", MANIFEST}


# --------------------------------------------------------------------------- names


def item_filename(folder: str) -> str:
    """The Item's file name in scene folder ``folder`` (``a/x`` -> ``x.stac.json``)."""
    return PurePosixPath(folder).name + ITEM_SUFFIX


def item_relpath(folder: str) -> str:
    """The Item of scene folder ``folder`` relative to the output folder."""
    return f"{folder}/{item_filename(folder)}"


def item_id(folder: str) -> str:
    """Unique per output folder and reversible: the scene folder, ``%`` and ``/`` percent-encoded
    (``a/x`` -> ``a%2Fx``; a top-level scene's id is its folder name)."""
    return folder.replace("%", "%25").replace("/", "%2F")


def collection_id(location: str) -> str:
    """The Collection's id: the output folder's (or S3 prefix's, or bucket's) last name."""
    location = str(location)
    if location[:5].lower() == "s3://":
        last = location[5:].rstrip("/").rsplit("/", 1)[-1]
    else:  # by the name as given where it has one: the driver and the writers may not share a cwd
        last = Path(os.path.normpath(location)).name
        if last in ("", ".", ".."):
            last = Path(location).resolve().name
    return re.sub(r"[^0-9A-Za-z._-]+", "_", last).strip("._") or "geoseg"


def _up(folder: str) -> str:
    """From scene folder ``folder`` to the output folder: ``x`` -> ``..``, ``a/x`` -> ``../..``."""
    return "/".join([".."] * len(PurePosixPath(folder).parts))


# --------------------------------------------------------------------------- the scene's Item


def _parse_time(value: str | None) -> datetime | None:
    """An input's acquisition time (``ACQUISITIONDATETIME``, e.g. ``2021-06-01 10:32:15``, UTC
    unless it says otherwise) as an aware datetime; None when absent or unreadable."""
    if not value:
        return None
    try:
        when = pystac.utils.str_to_datetime(value.strip().replace(" ", "T", 1))
    except (ValueError, OverflowError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _crs_fields(crs: CRS) -> dict[str, Any]:
    """``code`` when the CRS is known to an authority (as in summary.json's ``crs``), else ``wkt2``."""
    auth = crs.to_authority(min_confidence=70)
    return {"code": ":".join(auth)} if auth else {"wkt2": crs.to_wkt()}


def footprint(info: SceneInfo) -> tuple[dict[str, Any], list[float]]:
    """The raster's outline in EPSG:4326 (GeoJSON, edges densified, cut at the antimeridian) and
    its bbox (``[west, south, east, north]``, west > east when it crosses the antimeridian)."""
    from rasterio.warp import transform_bounds, transform_geom

    t, w, h = info.transform, info.width, info.height
    n = FOOTPRINT_POINTS - 1
    ring = (
        [(w * i / n, 0.0) for i in range(n)]
        + [(float(w), h * i / n) for i in range(n)]
        + [(w * (n - i) / n, float(h)) for i in range(n)]
        + [(0.0, h * (n - i) / n) for i in range(n)]
    )
    coords = [(t.c + t.a * col + t.b * row, t.f + t.d * col + t.e * row) for col, row in ring]
    if t.a * t.e < 0:  # north-up (y down the rows): the ring runs clockwise; GeoJSON wants counter-clockwise
        coords.reverse()
    coords.append(coords[0])
    geometry = transform_geom(info.crs_wkt, "EPSG:4326", {"type": "Polygon", "coordinates": [coords]})
    xs, ys = (t.c, t.c + t.a * w), (t.f, t.f + t.e * h)
    west, south, east, north = transform_bounds(
        info.crs_wkt, "EPSG:4326", min(xs), min(ys), max(xs), max(ys), densify_pts=FOOTPRINT_POINTS
    )
    if west <= east:  # widen to the geometry's own extent (its points lie between the sampled ones)
        points = _points(geometry)
        west, east = min([west] + [p[0] for p in points]), max([east] + [p[0] for p in points])
        south, north = min([south] + [p[1] for p in points]), max([north] + [p[1] for p in points])
    return geometry, [west, south, east, north]


def _points(geometry: dict[str, Any]) -> list[tuple[float, float]]:
    polygons = geometry["coordinates"] if geometry["type"] == "MultiPolygon" else [geometry["coordinates"]]
    return [(p[0], p[1]) for poly in polygons for ring in poly for p in ring]


def _classes(spec: ModelConfig) -> list[Classification]:
    """A semantic mask's classes (``name`` made schema-safe, the configured name kept as ``title``)
    and its nodata value."""
    classes = []
    for value, (name, color) in enumerate(zip(spec.classes, class_colors(spec))):
        hex_color = color.strip().lstrip("#")
        if len(hex_color) == 3:
            hex_color = "".join(c * 2 for c in hex_color)
        safe = _NAME_CHARS.sub("_", name) or f"class_{value}"
        classes.append(
            Classification.create(
                value=value,
                name=safe,
                title=name if safe != name else None,
                color_hint=hex_color.upper() if _HEX.match(hex_color) else None,
            )
        )
    classes.append(
        Classification.create(
            value=SEMANTIC_NODATA, name="nodata", nodata=True, description="no result: outside the input's valid pixels"
        )
    )
    return classes


def _mask_asset(item: pystac.Item, file: str, model: str, spec: ModelConfig) -> pystac.Asset:
    semantic = spec.task == "semantic"
    description = (
        f"{model}: class index per pixel, {SEMANTIC_NODATA} = nodata"
        if semantic
        else f"{model}: instance id per pixel ({spec.classes[0]}), 0 = none (also nodata); each id is "
        f"the instance_id of one feature of the GeoPackage layer '{model}'"
    )
    asset = pystac.Asset(
        f"./{file}", title=f"{model} mask", description=description, media_type=pystac.MediaType.COG, roles=["data"]
    )
    asset.set_owner(item)  # the extensions declare their schemas on the Item
    RasterExtension.ext(asset, add_if_missing=True).bands = [
        RasterBand.create(
            nodata=SEMANTIC_NODATA if semantic else 0, data_type=DataType.UINT8 if semantic else DataType.UINT32
        )
    ]
    if semantic:
        ClassificationExtension.ext(asset, add_if_missing=True).classes = _classes(spec)
    return asset


def _assets(item: pystac.Item, folder: Path, stem: str, config: Config) -> dict[str, pystac.Asset]:
    """One asset per file of a known kind in the scene's folder (top level, not hidden). Keys do not
    depend on the scene (``<stem>_landuse.parquet`` -> ``landuse_geoparquet``), so that every Item
    of a Collection names the same asset alike."""
    assets: dict[str, pystac.Asset] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        name = path.name
        if name.startswith(".") or name in _NOT_ASSETS or name.endswith((ITEM_SUFFIX, ".tmp", ".aux.xml")):
            continue
        base, suffix = path.stem, path.suffix.lower()
        short = base[len(stem) + 1 :] if base.startswith(f"{stem}_") else base  # "landuse", "quicklook"
        href = f"./{name}"
        if suffix in (".tif", ".tiff") and short in config.models and base != stem:
            key, asset = short, _mask_asset(item, name, short, config.models[short])
        elif suffix in (".tif", ".tiff"):
            key, asset = short, pystac.Asset(href, media_type=pystac.MediaType.GEOTIFF, roles=["data"])
        elif suffix == ".gpkg":
            key = "polygons" if base == stem else f"{short}_gpkg"
            asset = pystac.Asset(
                href,
                title="polygons and counts",
                media_type=pystac.MediaType.GEOPACKAGE,
                roles=["data"],
                description="one layer per model (MultiPolygon, the input's CRS) and the non-spatial table 'counts'",
            )
        elif suffix == ".parquet":
            key = f"{short}_geoparquet"
            asset = pystac.Asset(href, title=f"{short} polygons (GeoParquet)", media_type=PARQUET, roles=["data"])
        elif name == "summary.json":
            key, asset = (
                "summary",
                pystac.Asset(
                    href,
                    title="summary: counts and areas per class",
                    media_type=pystac.MediaType.JSON,
                    roles=["metadata"],
                ),
            )
        elif suffix == ".png":
            key = short
            asset = pystac.Asset(href, title=short, media_type=pystac.MediaType.PNG, roles=["overview", "thumbnail"])
        elif suffix in (".qml", ".sld"):
            key = f"{short}_style"
            media = "text/xml" if suffix == ".qml" else "application/vnd.ogc.sld+xml"
            asset = pystac.Asset(
                href,
                title=f"{'QGIS' if suffix == '.qml' else 'SLD'} style: {short}",
                media_type=media,
                roles=["style", "metadata"],
            )
        elif suffix == ".json":
            key, asset = short, pystac.Asset(href, media_type=pystac.MediaType.JSON, roles=["metadata"])
        else:
            continue
        while key in assets:
            key += "_"
        assets[key] = asset
    return assets


def scene_item(
    folder: Path,
    info: SceneInfo,
    config: Config,
    collection: str,
    stamp: dict[str, str] | None = None,
    now: datetime | None = None,
    cloud_cover: float | None = None,
    shadow_cover: float | None = None,
) -> pystac.Item:
    """The STAC Item of one scene whose files are in ``folder`` (its staging folder); the cloud
    cover geoseg measured (% of valid pixels) as ``eo:cloud_cover`` when a model has a cloud class."""
    now = now or datetime.now(timezone.utc)
    geometry, bbox = footprint(info)
    acquired = _parse_time(info.acquired)
    item = pystac.Item(
        id=item_id(info.folder), geometry=geometry, bbox=bbox, datetime=acquired or now, properties={}, collection=None
    )
    item.common_metadata.created = now
    item.properties["processing:software"] = {"geoseg": geoseg.__version__}
    item.properties["geoseg:input"] = info.path
    item.properties["geoseg:datetime"] = "acquisition" if acquired else "processing"
    for key in ("run", "config", "device"):
        if (stamp or {}).get(key):
            item.properties[f"geoseg:{key}"] = stamp[key]  # type: ignore[index]
    item.stac_extensions.append(PROCESSING_EXTENSION)
    source = info.derived_from
    if source is not None:  # a STAC Item input: its lineage (geoseg.raster.stac_input)
        item.add_link(
            pystac.Link(
                "derived_from", source["href"], media_type=pystac.MediaType.JSON, title=f"input Item {source['id']}"
            )
        )
        props = dict(source["properties"])
        if "eo:cloud_cover" in props:
            item.properties["geoseg:input_cloud_cover"] = props.pop("eo:cloud_cover")
            if cloud_cover is None:  # no cloud model ran: the input's own figure is the scene's
                EOExtension.ext(item, add_if_missing=True).cloud_cover = float(
                    item.properties["geoseg:input_cloud_cover"]
                )
        item.properties.update(props)
    if cloud_cover is not None:
        EOExtension.ext(item, add_if_missing=True).cloud_cover = float(cloud_cover)
        if shadow_cover is not None:
            item.properties["geoseg:cloud_shadow_cover"] = float(shadow_cover)
    t, xs = info.transform, (info.transform.c, info.transform.c + info.transform.a * info.width)
    ys = (t.f, t.f + t.e * info.height)
    ProjectionExtension.ext(item, add_if_missing=True).apply(
        **_crs_fields(CRS.from_wkt(info.crs_wkt)),
        shape=[info.height, info.width],
        transform=list(t)[:6],
        bbox=[min(xs), min(ys), max(xs), max(ys)],
    )
    for key, asset in _assets(item, folder, info.stem, config).items():
        item.add_asset(key, asset)
    item.collection_id = collection
    up = f"{_up(info.folder)}/{COLLECTION_FILE}"
    for rel in ("collection", "parent", "root"):
        item.add_link(pystac.Link(rel, up, media_type=pystac.MediaType.JSON, title=f"geoseg outputs: {collection}"))
    return item


def write_scene_item(
    folder: Path,
    info: SceneInfo,
    config: Config,
    store: OutputStore,
    stamp: dict[str, str] | None = None,
    cloud_cover: float | None = None,
    shadow_cover: float | None = None,
) -> Path | None:
    """Write the scene's Item into its staging folder ``folder``, after every other file it lists
    and before publishing; returns its path. Metadata does not fail a scene whose files are made:
    when the Item cannot be made (a CRS PROJ cannot take to EPSG:4326, say) the scene is published
    without it, which the log says, and the Collection leaves it out."""
    path = folder / item_filename(info.folder)
    try:
        item = scene_item(
            folder,
            info,
            config,
            collection_id(store.location),
            stamp,
            cloud_cover=cloud_cover,
            shadow_cover=shadow_cover,
        )
        write_json(path, item.to_dict(include_self_link=False, transform_hrefs=False))
    except OSError:
        raise  # disk full and the like: the writer reports it as it does for the other files
    except Exception as exc:  # noqa: BLE001 (any other reason: reported, never fatal)
        log.warning("%s: no STAC Item (%s)", info.path, " ".join(str(exc).split())[:300] or type(exc).__name__)
        return None
    return path
