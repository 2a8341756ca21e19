"""The run's STAC Collection (``collection.json`` in the output folder): the published scenes' Items
linked, their extents joined, rewritten after each run from the Items on disk or in S3."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import pystac

from geoseg.core.storage import OutputStore
from geoseg.outputs.stac import COLLECTION_FILE, collection_id, item_relpath

log = logging.getLogger("geoseg")


def _read_items(store: OutputStore, folders: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The published Items of ``folders`` (those that have one), in order; a read from object
    storage is a request or two, so they are read side by side."""

    def read(folder: str) -> dict[str, Any] | None:
        text = store.read_text(item_relpath(folder))
        try:
            data = json.loads(text) if text is not None else None
        except ValueError:
            data = None
        if text is None:
            return None
        if not _usable(data):
            log.warning(
                "%s: not a STAC Item with a bbox and a datetime, left out of %s",
                store.uri(item_relpath(folder)),
                COLLECTION_FILE,
            )
            return None
        return data

    with ThreadPoolExecutor(max_workers=16 if store.remote else 4) as pool:
        found = list(pool.map(read, folders))
    return [(folder, item) for folder, item in zip(folders, found) if item is not None]


def _usable(item: Any) -> bool:
    """A STAC Item whose bbox and time can go into the Collection's extent."""
    if not (
        isinstance(item, dict)
        and item.get("type") == "Feature"
        and isinstance(item.get("properties"), dict)
        and isinstance(item.get("assets", {}), dict)
    ):
        return False
    bbox = item.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        return False
    try:
        return bool(_times(item))
    except (ValueError, TypeError, OverflowError):
        return False


def _union(bboxes: list[list[float]]) -> list[float]:
    if any(b[0] > b[2] for b in bboxes):  # one crosses the antimeridian: all longitudes
        return [-180.0, min(b[1] for b in bboxes), 180.0, max(b[3] for b in bboxes)]
    return [min(b[0] for b in bboxes), min(b[1] for b in bboxes), max(b[2] for b in bboxes), max(b[3] for b in bboxes)]


def _times(item: dict[str, Any]) -> list[datetime]:
    props = item.get("properties", {})
    values = [props.get("datetime"), props.get("start_datetime"), props.get("end_datetime")]
    times = [pystac.utils.str_to_datetime(v) for v in values if isinstance(v, str) and v]
    return [t if t.tzinfo else t.replace(tzinfo=timezone.utc) for t in times]


def run_collection(store: OutputStore, manifest: dict[str, dict[str, Any]]) -> pystac.Collection | None:
    """The Collection of every scene published in the output folder: the folders the run manifest
    records (scenes of earlier runs included; a scene whose redo failed keeps its earlier, still
    published outputs), those that have an Item. None when there is none."""
    folders = sorted({str(e["output"]) for e in manifest.values() if e.get("output")})
    items = _read_items(store, folders)
    if not items:
        return None
    cid = collection_id(store.location)
    times = [t for _, item in items for t in _times(item)]
    extent = pystac.Extent(
        pystac.SpatialExtent([_union([item["bbox"] for _, item in items])]),
        pystac.TemporalExtent([[min(times), max(times)]]),
    )
    collection = pystac.Collection(
        id=cid,
        title=f"geoseg outputs: {cid}",
        extent=extent,
        license="other",
        description="Segmentation outputs made by geoseg: per scene, the masks (Cloud Optimized GeoTIFF), "
        "the polygons and counts (GeoPackage) and a summary.",
    )
    collection.clear_links()  # pystac's root link points at the object; written below as a relative href
    collection.add_link(
        pystac.Link("root", f"./{COLLECTION_FILE}", media_type=pystac.MediaType.JSON, title=collection.title)
    )
    for folder, _item in items:
        collection.add_link(
            pystac.Link("item", f"./{item_relpath(folder)}", media_type=pystac.MediaType.GEOJSON, title=folder)
        )
    codes = sorted(
        {str(item["properties"]["proj:code"]) for _, item in items if item.get("properties", {}).get("proj:code")}
    )
    if codes:
        collection.summaries.add("proj:code", codes)
    # The assets every scene has, described as in the newest scene (classes and colours included).
    newest = max((item for _, item in items), key=lambda i: str(i.get("properties", {}).get("created", "")))
    common = set.intersection(*(set(item.get("assets", {})) for _, item in items))
    definitions: dict[str, pystac.ItemAssetDefinition | dict[str, Any]] = {}
    for key in sorted(common):
        spec = {k: v for k, v in newest["assets"][key].items() if k != "href"}
        definitions[key] = pystac.ItemAssetDefinition(spec)
    collection.item_assets = definitions
    extensions = {url for _, item in items for url in item.get("stac_extensions", [])}
    collection.stac_extensions = sorted(
        url for url in extensions if "/classification/" in url or "/raster/" in url or "/projection/" in url
    )
    return collection


def write_collection(store: OutputStore, manifest: dict[str, dict[str, Any]]) -> bool:
    """Write ``collection.json`` at the top of the output folder (whole, replacing the last run's);
    False, and nothing written, while no scene has an Item."""
    collection = run_collection(store, manifest)
    if collection is None:
        return False
    data = collection.to_dict(include_self_link=False, transform_hrefs=False)
    store.write_text(COLLECTION_FILE, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return True
