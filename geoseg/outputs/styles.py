"""QGIS styles for a scene's outputs, so that they open styled without any set-up.

- The GeoPackage gets QGIS's ``layer_styles`` table: one default style per layer, as QML (read by
  QGIS) and SLD 1.1 (other clients). Semantic layers are categorised by ``class`` in the model's
  colours; instance layers get their own outline colour and a see-through fill.
- Each mask ``<stem>_<model>.tif`` gets a ``<stem>_<model>.qml`` beside it, which QGIS loads by
  itself: class names and colours for class masks, a colour cycling over ids for instance masks (so
  neighbouring objects differ; 0 stays transparent). QGIS looks for the same ``.qml`` beside
  ``<stem>_<model>.parquet``, so the file also holds the layer's vector style (a raster layer reads
  only its ``<pipe>``, a vector layer only its ``<renderer-v2>``).
"""

from __future__ import annotations

import functools
import sqlite3
import xml.etree.ElementTree as ET
from contextlib import closing
from pathlib import Path
from typing import NamedTuple

from geoseg.core.config import Config
from geoseg.core.heads import ModelConfig

_PALETTE = [
    "#1f78b4",
    "#33a02c",
    "#ffff99",
    "#e31a1c",
    "#b15928",
    "#a6cee3",
    "#b2df8a",
    "#fb9a99",
    "#fdbf6f",
    "#cab2d6",
]


def class_colors(spec: ModelConfig) -> list[str]:
    """Colour per class: the configured ones, else a fixed palette."""
    return list(spec.colors) if spec.colors else [_PALETTE[i % len(_PALETTE)] for i in range(len(spec.classes))]


def hex_rgb(hex_color: str) -> tuple[int, int, int]:
    """'#rrggbb' -> (r, g, b), 0-255."""
    h = hex_color.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


QGIS_VERSION = "3.22.0-Białowieża"  # the oldest QGIS these documents are written for (current LTRs read them)
# Instance heads without configured colours, in the order of the config (default: buildings, ships).
_INSTANCE_COLORS = ["#e4572e", "#00b4d8", "#ffc300", "#9b5de5", "#2ec4b6", "#ff006e"]
# Object colours of instance masks, cycling over ids (qualitative, high contrast on imagery).
_ID_COLORS = [
    "#e6194b",
    "#3cb44b",
    "#ffe119",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#42d4f4",
    "#f032e6",
    "#bfef45",
    "#fabed4",
    "#469990",
    "#dcbeff",
    "#9a6324",
    "#fffac8",
    "#800000",
    "#aaffc3",
]
# Instance masks with more objects than this draw the ids above it in one colour (a bounded .qml).
MAX_STYLED_IDS = 65536
_SLD_NS = {
    "": "http://www.opengis.net/sld",
    "se": "http://www.opengis.net/se",
    "ogc": "http://www.opengis.net/ogc",
    "xsi": "http://www.w3.org/2001/XMLSchema-instance",
}
SLD, SE, OGC, XSI = (f"{{{ns}}}" for ns in _SLD_NS.values())
for _prefix, _ns in _SLD_NS.items():  # prefixes of the SLD written (as QGIS writes them)
    ET.register_namespace(_prefix, _ns)
# The table QGIS creates when a style is saved into a GeoPackage (and reads each layer's default from).
_LAYER_STYLES = """CREATE TABLE IF NOT EXISTS "layer_styles" (
    "id" INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    "f_table_catalog" TEXT(256),
    "f_table_schema" TEXT(256),
    "f_table_name" TEXT(256),
    "f_geometry_column" TEXT(256),
    "styleName" TEXT(30),
    "styleQML" TEXT,
    "styleSLD" TEXT,
    "useAsDefault" BOOLEAN,
    "description" TEXT,
    "owner" TEXT(30),
    "ui" TEXT(30),
    "update_time" DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now'))
)"""
_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ','now')"


class Symbol(NamedTuple):
    """How one class is drawn: fill and outline as '#rrggbb' with an opacity, outline width in mm."""

    value: str
    fill: str
    fill_alpha: int
    outline: str
    outline_width_mm: float


def layer_symbols(config: Config) -> dict[str, list[Symbol]]:
    """Per model, one symbol per class: semantic classes filled in the model's colours (outlined a
    shade darker), instance objects outlined in the head's colour over a see-through fill."""
    out: dict[str, list[Symbol]] = {}
    n_instance = 0
    for name, spec in config.models.items():
        if spec.task == "semantic":
            out[name] = [Symbol(c, col, 255, _darker(col), 0.2) for c, col in zip(spec.classes, class_colors(spec))]
        else:
            col = spec.colors[0] if spec.colors else _INSTANCE_COLORS[n_instance % len(_INSTANCE_COLORS)]
            n_instance += 1
            out[name] = [Symbol(c, col, 64, col, 0.6) for c in spec.classes]
    return out


def write_mask_styles(config: Config, masks: dict[str, Path], objects: dict[str, int]) -> None:
    """A ``.qml`` beside each mask (``masks``: model -> mask path; ``objects``: model -> objects in
    its instance mask, ids 1..n). The GeoPackage's styles come with it (``geoseg.outputs.gpkg_template``)."""
    for name, path in masks.items():
        write_mask_style(path, name, config, objects.get(name, 0))


def write_layer_styles(gpkg: Path, config: Config) -> None:
    """Each model's layer gets a default style in the GeoPackage's ``layer_styles`` (QML + SLD),
    registered in ``gpkg_contents`` as an attributes table, as QGIS itself writes it."""
    symbols = layer_symbols(config)
    with closing(sqlite3.connect(gpkg)) as db, db:
        db.execute(_LAYER_STYLES)
        if not db.execute("SELECT 1 FROM gpkg_contents WHERE table_name = 'layer_styles'").fetchone():
            db.execute(
                "INSERT INTO gpkg_contents (table_name, data_type, identifier, description, last_change, srs_id) "
                f"VALUES ('layer_styles', 'attributes', 'layer_styles', '', {_NOW}, 0)"
            )
        geometry = dict(db.execute("SELECT table_name, column_name FROM gpkg_geometry_columns").fetchall())
        for name in config.models:
            column = geometry.get(name, "geom")
            db.execute("DELETE FROM layer_styles WHERE f_table_name = ? AND styleName = ?", (name, name))
            db.execute(
                "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column, "
                "styleName, "
                "styleQML, styleSLD, useAsDefault, description, owner, ui, update_time) "
                f"VALUES ('', '', ?, ?, ?, ?, ?, 1, ?, '', NULL, {_NOW})",
                (
                    name,
                    column,
                    name,
                    qml(vector_renderer(symbols[name])),
                    sld(name, symbols[name]),
                    f"geoseg: {name} by class",
                ),
            )
        has_ogr_contents = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'gpkg_ogr_contents'"
        ).fetchone()
        if has_ogr_contents:  # GDAL's feature counts (no triggers here: GDAL counts when it is NULL)
            db.execute("DELETE FROM gpkg_ogr_contents WHERE table_name = 'layer_styles'")
            db.execute("INSERT INTO gpkg_ogr_contents (table_name, feature_count) VALUES ('layer_styles', NULL)")


def write_mask_style(mask: Path, name: str, config: Config, n_objects: int = 0) -> Path:
    """``<mask>.qml`` beside a mask: its raster style and its layer's vector style (see the module)."""
    path = mask.with_suffix(".qml")
    spec = config.models[name]
    symbols = tuple(layer_symbols(config)[name])
    if spec.task == "semantic":
        text = _mask_qml(symbols, tuple(spec.classes), tuple(class_colors(spec)), None)
    else:
        text = _mask_qml(symbols, (), (), n_objects)
    path.write_text(text, encoding="utf-8")
    return path


@functools.lru_cache(maxsize=256)
def _mask_qml(
    symbols: tuple[Symbol, ...], classes: tuple[str, ...], colors: tuple[str, ...], n_objects: int | None
) -> str:
    """A mask's QML from what it depends on (a class mask: its classes and colours; an instance
    mask: its number of objects), kept: a writer styles the same masks scene after scene, and
    building the document took 1.3 ms a mask."""
    if n_objects is None:
        pipe = _palette(classes, colors)
    else:
        pipe = id_pipe(n_objects)
    return qml(pipe, vector_renderer(list(symbols)))


# --- QML (QGIS's own style document) ----------------------------------------------------------------


def qml(*elements: ET.Element) -> str:
    """A QGIS style document holding the given renderers."""
    root = ET.Element("qgis", version=QGIS_VERSION, styleCategories="Symbology")
    root.extend(elements)
    if any(e.tag == "renderer-v2" for e in elements):
        ET.SubElement(root, "layerGeometryType").text = "2"  # polygons
    ET.SubElement(root, "blendMode").text = "0"
    ET.indent(root)
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ET.tostring(root, encoding="unicode") + "\n"


def vector_renderer(symbols: list[Symbol]) -> ET.Element:
    """A renderer categorised on ``class``: one category (and fill symbol) per class."""
    r = ET.Element(
        "renderer-v2",
        type="categorizedSymbol",
        attr="class",
        forceraster="0",
        symbollevels="0",
        enableorderby="0",
        referencescale="-1",
    )
    cats = ET.SubElement(r, "categories")
    syms = ET.SubElement(r, "symbols")
    for i, s in enumerate(symbols):
        ET.SubElement(cats, "category", symbol=str(i), value=s.value, label=s.value, render="true")
        syms.append(_fill_symbol(str(i), s))
    src = ET.SubElement(r, "source-symbol")
    src.append(_fill_symbol("0", symbols[0]))
    ET.SubElement(r, "rotation")
    ET.SubElement(r, "sizescale")
    return r


def _fill_symbol(name: str, s: Symbol) -> ET.Element:
    sym = ET.Element("symbol", type="fill", name=name, alpha="1", clip_to_extent="1", force_rhr="0")
    layer = ET.SubElement(sym, "layer", {"class": "SimpleFill", "enabled": "1", "locked": "0", "pass": "0"})
    props = {
        "color": _qcolor(s.fill, s.fill_alpha),
        "style": "solid",
        "outline_color": _qcolor(s.outline, 255),
        "outline_style": "solid",
        "outline_width": f"{s.outline_width_mm:g}",
        "outline_width_unit": "MM",
        "joinstyle": "bevel",
        "offset": "0,0",
        "offset_unit": "MM",
    }
    # QGIS >= 3.16 reads the Option map, older 3.x the <prop> list; QGIS 3.22 writes both.
    options = ET.SubElement(layer, "Option", type="Map")
    for k, v in props.items():
        ET.SubElement(options, "Option", name=k, type="QString", value=v)
    for k, v in props.items():
        ET.SubElement(layer, "prop", k=k, v=v)
    return sym


def _palette(classes: tuple[str, ...], colors: tuple[str, ...]) -> ET.Element:
    """Class mask: a paletted renderer with the class names as labels (255, nodata, transparent)."""
    pipe, renderer = _pipe("paletted")
    palette = ET.SubElement(renderer, "colorPalette")
    for i, (cls, col) in enumerate(zip(classes, colors)):
        ET.SubElement(palette, "paletteEntry", value=str(i), color=col, alpha="255", label=cls)
    return pipe


def id_pipe(n_objects: int) -> ET.Element:
    """Instance mask: ids 1..n in colours that cycle (neighbours, numbered in turn, differ); 0 transparent.

    A discrete colour ramp with one entry per id up to ``MAX_STYLED_IDS``; ids above draw grey.
    """
    top = max(1, n_objects)
    pipe, renderer = _pipe("singlebandpseudocolor", classificationMin="1", classificationMax=str(top))
    shader = ET.SubElement(
        ET.SubElement(renderer, "rastershader"),
        "colorrampshader",
        colorRampType="DISCRETE",
        classificationMode="1",
        clip="0",
        minimumValue="1",
        maximumValue=str(top),
        labelPrecision="0",
    )
    ET.SubElement(shader, "item", value="0", label="none", color="#000000", alpha="0")
    for i in range(1, min(n_objects, MAX_STYLED_IDS) + 1):
        ET.SubElement(shader, "item", value=str(i), label=str(i), color=_ID_COLORS[i % len(_ID_COLORS)], alpha="255")
    if n_objects > MAX_STYLED_IDS:
        ET.SubElement(shader, "item", value="inf", label=f"> {MAX_STYLED_IDS}", color="#bebebe", alpha="255")
    return pipe


def _pipe(kind: str, **attrs: str) -> tuple[ET.Element, ET.Element]:
    pipe = ET.Element("pipe")
    # attrib ({}, its default) is passed positionally so that mypy does not match **attrs against it.
    renderer = ET.SubElement(
        pipe, "rasterrenderer", {}, type=kind, band="1", opacity="1", alphaBand="-1", nodataColor="", **attrs
    )
    ET.SubElement(renderer, "rasterTransparency")
    mmo = ET.SubElement(renderer, "minMaxOrigin")
    for k, v in (
        ("limits", "None"),
        ("extent", "WholeRaster"),
        ("statAccuracy", "Estimated"),
        ("cumulativeCutLower", "0.02"),
        ("cumulativeCutUpper", "0.98"),
        ("stdDevFactor", "2"),
    ):
        ET.SubElement(mmo, k).text = v
    ET.SubElement(pipe, "brightnesscontrast", brightness="0", contrast="0", gamma="1")
    ET.SubElement(
        pipe,
        "huesaturation",
        saturation="0",
        grayscaleMode="0",
        colorizeOn="0",
        colorizeRed="255",
        colorizeGreen="128",
        colorizeBlue="128",
        colorizeStrength="100",
        invertColors="0",
    )
    ET.SubElement(pipe, "rasterresampler", maxOversampling="2")  # nearest neighbour: ids and classes stay crisp
    return pipe, renderer


# --- SLD 1.1 (for clients other than QGIS) -----------------------------------------------------------


def sld(layer: str, symbols: list[Symbol]) -> str:
    """A Styled Layer Descriptor 1.1 with one rule per class (a filter on ``class``)."""
    root = ET.Element(
        SLD + "StyledLayerDescriptor",
        {
            "version": "1.1.0",
            XSI
            + "schemaLocation": "http://www.opengis.net/sld http://schemas.opengis.net/sld/1.1.0/StyledLayerDescriptor.xsd",
        },
    )
    named = ET.SubElement(root, SLD + "NamedLayer")
    ET.SubElement(named, SE + "Name").text = layer
    user = ET.SubElement(named, SLD + "UserStyle")
    ET.SubElement(user, SE + "Name").text = layer
    fts = ET.SubElement(user, SE + "FeatureTypeStyle")
    for s in symbols:
        rule = ET.SubElement(fts, SE + "Rule")
        ET.SubElement(rule, SE + "Name").text = s.value
        ET.SubElement(ET.SubElement(rule, SE + "Description"), SE + "Title").text = s.value
        equal = ET.SubElement(ET.SubElement(rule, OGC + "Filter"), OGC + "PropertyIsEqualTo")
        ET.SubElement(equal, OGC + "PropertyName").text = "class"
        ET.SubElement(equal, OGC + "Literal").text = s.value
        polygon = ET.SubElement(rule, SE + "PolygonSymbolizer")
        # SLD widths are pixels, 0.28 mm each (the OGC standard rendering pixel)
        for part, params in (
            ("Fill", {"fill": s.fill, "fill-opacity": f"{s.fill_alpha / 255:.2f}"}),
            (
                "Stroke",
                {"stroke": s.outline, "stroke-width": f"{s.outline_width_mm / 0.28:.1f}", "stroke-linejoin": "bevel"},
            ),
        ):
            element = ET.SubElement(polygon, SE + part)
            for k, v in params.items():
                ET.SubElement(element, SE + "SvgParameter", name=k).text = v
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _qcolor(hex_color: str, alpha: int) -> str:
    return ",".join(str(v) for v in (*hex_rgb(hex_color), alpha))


def _darker(hex_color: str) -> str:
    return "#" + "".join(f"{int(v * 0.6):02x}" for v in hex_rgb(hex_color))
