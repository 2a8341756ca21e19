"""STAC Items as inputs: each Item is one scene whose bands come from its assets, picked by name and
stacked on one pixel grid in a GDAL VRT that the workers read window by window like any raster.

A head names the bands it reads (its contract's ``input.names``, e.g. blue, green, red, nir); an
Item's band is found by its common name (STAC 1.0 ``eo:bands``, 1.1 ``bands`` with
``eo:common_name``), its band name (``B02``) or, for a one-band asset, the asset's key. Bands at
other resolutions are resampled onto the finest grid the heads read (``average`` when coarser
pixels are made, ``bilinear`` when finer ones are); assets in another CRS are refused. A band's
``raster:bands`` scale and offset, when the Item gives them, replace the head's own (reflectance =
DN * scale + offset), and its nodata value marks pixels invalid.

Inputs: a local Item, ItemCollection, Collection or Catalog file, or an ``https://`` one (pystac
reads it); each Item of a collection is an input named ``<file>#<item id>``. Items a STAC API search
found (``geoseg.raster.stac_search``) are inputs named by their URL on the API, read from the search's
answer (``remember_items``), not fetched again.
"""

from __future__ import annotations

import functools
import html
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import pystac
import rasterio
from rasterio.errors import RasterioIOError

from geoseg.core.errors import InputError
from geoseg.core.s3 import file_fingerprint, gdal_path, is_s3, s3_client, split_uri

ITEM_SEPARATOR = "#"
# Items a STAC API search returned, by their URL (the input path that names each): a run looks each
# Item up several times, and an API is asked once.
_SEARCHED: dict[str, pystac.Item] = {}


class _StacIO(pystac.stac_io.DefaultStacIO):
    """pystac's reader, with ``s3://`` documents read through boto3 (the run's endpoint and
    credentials, as the outputs use) rather than left to fail."""

    def read_text_from_href(self, href: str) -> str:
        if is_s3(href):
            bucket, key = split_uri(href)
            body: bytes = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
            return body.decode("utf-8")
        return super().read_text_from_href(href)


_STAC_IO = _StacIO()


def remember_items(found: list[tuple[str, pystac.Item]]) -> None:
    """Keep Items a search returned under their URLs, so that these URLs are inputs (``is_stac``)."""
    _SEARCHED.update(found)


def is_stac(path: str) -> bool:
    """Whether an input names a STAC document (a ``.json`` file or URL, with an item id or not) or an
    Item a STAC API search returned."""
    return path in _SEARCHED or path.split(ITEM_SEPARATOR, 1)[0].lower().endswith(".json")


def read_items(href: str) -> list[tuple[str, pystac.Item]]:
    """The Items a STAC document holds, each with the input path that names it: the file for an
    Item, ``<file>#<id>`` for the Items of an ItemCollection, a Collection or a Catalog. A local
    file is read once while it is unchanged (a run looks each Item up several times); an Item a
    search returned is not read again."""
    if href in _SEARCHED:
        return [(href, _SEARCHED[href])]
    try:
        st = os.stat(href)
    except OSError:
        return _read_items(href)
    return _read_items_of_file(href, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_items_of_file(href: str, size: int, mtime_ns: int) -> list[tuple[str, pystac.Item]]:
    del size, mtime_ns  # the cache key: a changed file is read again
    return _read_items(href)


def _read_items(href: str) -> list[tuple[str, pystac.Item]]:
    try:
        obj: Any = (
            pystac.read_file(href, stac_io=_STAC_IO)
            if _has_type(href)
            else pystac.ItemCollection.from_file(href, stac_io=_STAC_IO)
        )
    except Exception as exc:  # noqa: BLE001 (pystac raises many kinds; one line names the file)
        raise InputError(href, f"not a readable STAC document ({str(exc).splitlines()[0][:200]})") from None
    if isinstance(obj, pystac.Item):
        return [(href, obj)]
    items = list(obj.items) if isinstance(obj, pystac.ItemCollection) else list(obj.get_items(recursive=True))
    if not items:
        raise InputError(href, "STAC document holds no Item")
    return [(f"{href}{ITEM_SEPARATOR}{item.id}", item) for item in items]


def _has_type(href: str) -> bool:
    """ItemCollections (GeoJSON FeatureCollections) are read by their own class in pystac."""
    try:
        data = _STAC_IO.read_json(href)
    except Exception:  # noqa: BLE001
        return True  # pystac.read_file then says what is wrong
    return data.get("type") != "FeatureCollection"


def load_item(path: str) -> pystac.Item:
    """The Item an input path names (``file`` or ``file#id``)."""
    href, _, item_id = path.partition(ITEM_SEPARATOR)
    for _named, item in read_items(href):
        if not item_id or item.id == item_id:
            return item
    raise InputError(path, f"no Item with id '{item_id}' in {href}")


@dataclass(frozen=True)
class BandSource:
    """Where one named band lives: an asset's file and its band index, with scale, offset, nodata."""

    name: str
    href: str
    index: int  # 1-based band of the asset's file
    scale: float | None = None
    offset: float | None = None
    nodata: float | None = None


def _band_dicts(asset: pystac.Asset) -> list[dict[str, Any]]:
    """The asset's bands, STAC 1.1 ``bands`` merged with 1.0 ``eo:bands`` and ``raster:bands``."""
    extra = asset.extra_fields
    bands = [dict(b) for b in extra.get("bands") or []]
    for key in ("eo:bands", "raster:bands"):
        for i, b in enumerate(extra.get(key) or []):
            if i >= len(bands):
                bands.append({})
            bands[i].update({k.removeprefix("eo:"): v for k, v in b.items()})
    return [{k.removeprefix("eo:").removeprefix("raster:"): v for k, v in b.items()} for b in bands]


def asset_href(asset: pystac.Asset) -> str:
    """Where an asset's file is: its href made absolute against its Item's, a ``file://`` URI as the
    local path it names (how an API served over HTTP points at files on a shared file system)."""
    href = asset.get_absolute_href() or asset.href
    if href.lower().startswith("file://"):
        return url2pathname(urlsplit(href).path)
    return href


def item_bands(item: pystac.Item) -> dict[str, BandSource]:
    """Every band an Item's assets name, by lower-case common name, band name and one-band asset key."""
    found: dict[str, BandSource] = {}
    for key, asset in item.assets.items():
        if asset.media_type and "tiff" not in asset.media_type and "jp2" not in asset.media_type:
            continue
        href = asset_href(asset)
        bands = _band_dicts(asset) or [{}]
        for i, b in enumerate(bands, start=1):
            source = BandSource(
                str(b.get("common_name") or b.get("name") or key),
                href,
                i,
                b.get("scale"),
                b.get("offset"),
                b.get("nodata"),
            )
            names = [b.get("common_name"), b.get("name")] + ([key] if len(bands) == 1 else [])
            for n in names:
                if n:
                    found.setdefault(str(n).lower(), source)
    return found


def raster_band_names(config: Any) -> dict[int, str]:
    """Which named band each raster band index of the config is (from the heads' ``input.names``)."""
    names: dict[int, str] = {}
    for head, spec in config.models.items():
        if spec.input.names is None:
            raise InputError(head, f"model '{head}' names no bands (input.names): it cannot pick them from a STAC Item")
        for index, name in zip(spec.bands, spec.input.names):
            if names.setdefault(index, name.lower()) != name.lower():
                raise InputError(head, f"band {index} is '{names[index]}' for one model and '{name}' for another")
    return names


def _grid(source: BandSource, path: str) -> dict[str, Any]:
    try:
        with rasterio.open(gdal_path(source.href)) as ds:
            return {
                "crs": ds.crs,
                "transform": ds.transform,
                "width": ds.width,
                "height": ds.height,
                "dtype": ds.dtypes[source.index - 1],
                "nodata": ds.nodatavals[source.index - 1],
            }
    except (RasterioIOError, IndexError) as exc:
        raise InputError(
            path, f"band '{source.name}': cannot read {source.href} ({str(exc).splitlines()[0][:200]})"
        ) from None


def item_vrt(path: str, item: pystac.Item, config: Any) -> tuple[str, dict[str, tuple[float, float]]]:
    """The VRT (XML text) that stacks the bands ``config`` reads, in its band order, on the finest
    grid among them; and, per head, the (scale, offset) the Item gives its bands (when it does)."""
    wanted = raster_band_names(config)
    bands = item_bands(item)
    missing = [n for n in wanted.values() if n not in bands]
    if missing:
        have = ", ".join(sorted({b.name for b in bands.values()})) or "none"
        raise InputError(
            path,
            f"Item {item.id} has no band '{missing[0]}' (its bands: {have}); "
            "map the models' bands to its assets or use another Item",
        )
    sources = {index: bands[name] for index, name in wanted.items()}
    grids = {index: _grid(src, path) for index, src in sources.items()}
    ref = min(grids, key=lambda i: abs(grids[i]["transform"].a))
    g = grids[ref]
    for index, grid in grids.items():
        if grid["crs"] != g["crs"]:
            raise InputError(
                path,
                f"band '{sources[index].name}' is in {grid['crs']}, band '{sources[ref].name}' "
                f"in {g['crs']}: warp the assets to one CRS first",
            )
    count = max(sources)
    dtype = g["dtype"]
    if any(grids[i]["dtype"] != dtype for i in grids) or len(sources) != count:
        raise InputError(path, "bands of different data types, or band indexes with gaps, are not supported")
    t = g["transform"]
    parts = [
        f'<VRTDataset rasterXSize="{g["width"]}" rasterYSize="{g["height"]}">',
        f"<SRS>{html.escape(g['crs'].to_wkt())}</SRS>",
        f"<GeoTransform>{t.c!r}, {t.a!r}, {t.b!r}, {t.f!r}, {t.d!r}, {t.e!r}</GeoTransform>",
    ]
    for index in range(1, count + 1):
        src, grid = sources[index], grids[index]
        st = grid["transform"]
        # The source's extent in the reference grid's pixels.
        x0, y0 = (st.c - t.c) / t.a, (st.f - t.f) / t.e
        w, h = grid["width"] * st.a / t.a, grid["height"] * st.e / t.e
        resampling = "average" if abs(st.a) < abs(t.a) else ("bilinear" if abs(st.a) > abs(t.a) else "nearest")
        nodata = src.nodata if src.nodata is not None else grid["nodata"]
        nodata_xml = f"<NoDataValue>{nodata!r}</NoDataValue>" if nodata is not None else ""
        parts.append(
            f'<VRTRasterBand dataType="{_gdal_type(dtype)}" band="{index}">{nodata_xml}'
            f"<Description>{html.escape(src.name)}</Description>"
            f'<ComplexSource resampling="{resampling}"><SourceFilename relativeToVRT="0">'
            f"{html.escape(gdal_path(src.href))}</SourceFilename><SourceBand>{src.index}</SourceBand>"
            f'<SrcRect xOff="0" yOff="0" xSize="{grid["width"]}" ySize="{grid["height"]}"/>'
            f'<DstRect xOff="{x0!r}" yOff="{y0!r}" xSize="{w!r}" ySize="{h!r}"/>'
            f"{nodata_xml.replace('NoDataValue', 'NODATA')}</ComplexSource></VRTRasterBand>"
        )
    parts.append("</VRTDataset>")
    return "".join(parts), _scale_offsets(path, config, sources)


def _scale_offsets(path: str, config: Any, sources: dict[int, BandSource]) -> dict[str, tuple[float, float]]:
    """Per head, the Item's (scale, offset) of its bands: one pair for all of them, or none given."""
    out: dict[str, tuple[float, float]] = {}
    for head, spec in config.models.items():
        pairs = {(sources[i].scale, sources[i].offset) for i in spec.bands}
        if pairs == {(None, None)}:
            continue
        if len(pairs) > 1:
            raise InputError(
                path,
                f"model '{head}': its bands have different raster:bands scale/offset ({sorted(pairs, key=str)}); "
                "geoseg applies one per model",
            )
        scale, offset = pairs.pop()
        out[head] = (1.0 if scale is None else float(scale), 0.0 if offset is None else float(offset))
    return out


def _gdal_type(dtype: str) -> str:
    return {
        "uint8": "Byte",
        "uint16": "UInt16",
        "int16": "Int16",
        "uint32": "UInt32",
        "int32": "Int32",
        "float32": "Float32",
        "float64": "Float64",
    }.get(dtype, "Float32")


# Properties of an input Item that its output Item repeats (its eo:cloud_cover as geoseg:input_cloud_cover).
LINEAGE_PROPERTIES = ("platform", "constellation", "instruments", "eo:cloud_cover")


def item_fingerprint(path: str) -> dict[str, Any] | None:
    """What identifies an Item input's content without reading pixels: its ``updated`` time and each
    asset's size and mtime (local), or size and ETag (S3; HTTP(S): ETag or Last-Modified, from a HEAD
    request). None where an asset says none of these: the Item is then always processed."""
    item = load_item(path)
    assets = {}
    for key, asset in sorted(item.assets.items()):
        href = asset_href(asset)
        assets[key] = file_fingerprint(href)
        if assets[key] is None:
            return None
    return {"updated": item.properties.get("updated"), "assets": assets}
