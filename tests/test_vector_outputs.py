"""Styled layers and GeoParquet: the GeoPackage's QGIS ``layer_styles``, the ``.qml`` beside each
mask, and ``<stem>_<model>.parquet`` (GeoParquet 1.1) equal to its GeoPackage layer."""

from __future__ import annotations

import json
import sqlite3
import sys
import xml.etree.ElementTree as ET

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pyogrio
import pytest
import shapely
from click.testing import CliRunner

import geoseg
from geoseg.cli.main import cli, main
from geoseg.core.config import load_config
from geoseg.outputs.styles import class_colors
from geoseg.runner.pipeline import run
from geoseg.train.synth import write_scene

SE, OGC = "{http://www.opengis.net/se}", "{http://www.opengis.net/ogc}"
MODELS = ("landuse", "buildings", "ships")


@pytest.fixture(scope="module")
def outputs(ray_session, tmp_path_factory, oracle_config_path):
    """One real run of a 512 x 512 synthetic scene with both vector formats."""
    root = tmp_path_factory.mktemp("vectors")
    scene = root / "vec.tif"
    write_scene(scene, size=512, seed=21)
    config = load_config(
        oracle_config_path, {"tiling": {"tile_size": 256, "halo": 16}, "output": {"vectors": "gpkg,parquet"}}
    )
    assert config.output.vectors == ["gpkg", "parquet"]
    report = run([str(scene)], root / "out", config, progress=False)
    assert report.ok, report.failures
    return config, root / "out" / "vec"


def _styles(gpkg) -> dict[str, tuple]:
    with sqlite3.connect(gpkg) as db:
        rows = db.execute(
            "select f_table_name, f_geometry_column, styleName, styleQML, styleSLD, useAsDefault from layer_styles"
        ).fetchall()
    return {r[0]: r[1:] for r in rows}


def _qml(text: str) -> ET.Element:
    assert text.startswith("<!DOCTYPE qgis")
    root = ET.fromstring(text)
    assert root.tag == "qgis"
    return root


def _categories(root: ET.Element) -> list[tuple[str, str, str]]:
    """(value, fill colour, outline colour) per category of a categorised renderer."""
    renderer = root.find("renderer-v2")
    assert renderer is not None and renderer.get("type") == "categorizedSymbol" and renderer.get("attr") == "class"
    symbols = {s.get("name"): s for s in renderer.find("symbols")}
    out = []
    for cat in renderer.find("categories"):
        layer = symbols[cat.get("symbol")].find("layer")
        assert layer.get("class") == "SimpleFill"
        opts = {o.get("name"): o.get("value") for o in layer.find("Option")}
        assert opts == {p.get("k"): p.get("v") for p in layer.findall("prop")}  # both forms agree
        out.append((cat.get("value"), opts["color"], opts["outline_color"]))
    return out


def _rgba(hex_color: str, alpha: int = 255) -> str:
    h = hex_color.lstrip("#")
    return f"{int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},{alpha}"


def test_layer_styles_categorise_land_use_in_the_models_colours(outputs):
    config, out = outputs
    styles = _styles(out / "vec.gpkg")
    assert set(styles) == set(MODELS)
    for name, (geom_col, style_name, _, _, default) in styles.items():
        assert (geom_col, style_name, default) == ("geom", name, 1)
    spec = config.models["landuse"]
    _, _, qml, sld, _ = styles["landuse"]
    cats = _categories(_qml(qml))
    assert [c[0] for c in cats] == spec.classes
    assert [c[1] for c in cats] == [_rgba(c) for c in class_colors(spec)] == [_rgba(c) for c in spec.colors]
    # SLD 1.1: one rule per class, filtered on the class, filled in its colour.
    root = ET.fromstring(sld)
    assert root.tag == "{http://www.opengis.net/sld}StyledLayerDescriptor" and root.get("version") == "1.1.0"
    rules = root.findall(f".//{SE}Rule")
    assert [r.find(f"{SE}Name").text for r in rules] == spec.classes
    for rule, cls, colour in zip(rules, spec.classes, spec.colors):
        equal = rule.find(f"{OGC}Filter/{OGC}PropertyIsEqualTo")
        assert (equal.find(f"{OGC}PropertyName").text, equal.find(f"{OGC}Literal").text) == ("class", cls)
        fill = {p.get("name"): p.text for p in rule.findall(f"{SE}PolygonSymbolizer/{SE}Fill/{SE}SvgParameter")}
        assert fill["fill"] == colour


def test_instance_layers_have_their_own_outline_and_see_through_fill(outputs):
    config, out = outputs
    styles = _styles(out / "vec.gpkg")
    outlines = {}
    for name in ("buildings", "ships"):
        _, _, qml, sld, _ = styles[name]
        [(value, fill, outline)] = _categories(_qml(qml))
        assert value == config.models[name].classes[0]
        assert int(fill.split(",")[3]) < 255 and outline.endswith(",255") and fill[:-3] != outline
        assert fill.rsplit(",", 1)[0] == outline.rsplit(",", 1)[0]  # the same hue, see-through
        assert len(ET.fromstring(sld).findall(f".//{SE}Rule")) == 1
        outlines[name] = outline
    assert outlines["buildings"] != outlines["ships"]


def test_geopackage_stays_valid_with_the_styles_table(outputs):
    _, out = outputs
    gpkg = out / "vec.gpkg"
    layers = dict(pyogrio.list_layers(gpkg))
    assert layers == {
        "landuse": "MultiPolygon",
        "buildings": "MultiPolygon",
        "ships": "MultiPolygon",
        "counts": None,
        "layer_styles": None,
    }
    assert len(pyogrio.read_dataframe(gpkg, layer="layer_styles")) == 3
    with sqlite3.connect(gpkg) as db:
        assert db.execute("select data_type from gpkg_contents where table_name = 'layer_styles'").fetchone() == (
            "attributes",
        )
        assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    assert len(pyogrio.read_dataframe(gpkg, layer="buildings")) > 0


def test_each_mask_has_a_qml_that_qgis_loads_beside_it(outputs):
    config, out = outputs
    summary = json.loads((out / "summary.json").read_text())
    for name in MODELS:
        root = _qml((out / f"vec_{name}.qml").read_text())
        renderer = root.find("pipe/rasterrenderer")
        assert root.find("renderer-v2") is not None  # the same file styles vec_<model>.parquet
        if name == "landuse":
            assert renderer.get("type") == "paletted"
            entries = renderer.findall("colorPalette/paletteEntry")
            assert [(e.get("value"), e.get("label"), e.get("color")) for e in entries] == [
                (str(i), c, col)
                for i, (c, col) in enumerate(zip(config.models[name].classes, config.models[name].colors))
            ]
            continue
        n = summary["models"][name]["classes"][config.models[name].classes[0]]["count"]
        assert n > 0
        assert renderer.get("type") == "singlebandpseudocolor"
        shader = renderer.find("rastershader/colorrampshader")
        assert shader.get("colorRampType") == "DISCRETE"
        items = shader.findall("item")
        assert [int(i.get("value")) for i in items] == list(range(n + 1))
        assert items[0].get("alpha") == "0"  # 0: no object
        colours = [i.get("color") for i in items[1:]]
        assert all(a != b for a, b in zip(colours, colours[1:])), "consecutive ids must differ"


def test_geoparquet_equals_its_geopackage_layer(outputs):
    _, out = outputs
    for name in MODELS:
        path = out / f"vec_{name}.parquet"
        geo = json.loads(pq.read_schema(path).metadata[b"geo"])
        assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
        column = geo["columns"]["geometry"]
        assert column["encoding"] == "WKB" and column["geometry_types"] == ["MultiPolygon"]
        assert column["covering"] == {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}
        pdf = gpd.read_parquet(path)
        gdf = gpd.read_file(out / "vec.gpkg", layer=name)
        assert len(pdf) == len(gdf) > 0, name
        assert pdf.crs == gdf.crs and column["crs"]["id"] == {"authority": "EPSG", "code": gdf.crs.to_epsg()}
        attrs = [c for c in gdf.columns if c != "geometry"]
        assert [c for c in pdf.columns if c != "geometry"] == attrs  # geopandas hides the covering column
        pd.testing.assert_frame_equal(pd.DataFrame(pdf[attrs]), pd.DataFrame(gdf[attrs]))
        assert [g.normalize().wkb for g in pdf.geometry] == [g.normalize().wkb for g in gdf.geometry], name
        bbox = pq.read_table(path, columns=["bbox"]).column("bbox").combine_chunks().flatten()
        bbox = np.column_stack([a.to_numpy() for a in bbox])  # xmin, ymin, xmax, ymax
        assert np.array_equal(bbox, shapely.bounds(pdf.geometry.values))
        assert np.allclose(column["bbox"], gdf.total_bounds)


def test_duckdb_reads_the_geoparquet(outputs):
    duckdb = pytest.importorskip("duckdb")
    _, out = outputs
    path = out / "vec_buildings.parquet"
    gdf = gpd.read_file(out / "vec.gpkg", layer="buildings")
    [(n, total)] = duckdb.sql(f"select count(*), sum(area_m2) from read_parquet('{path}')").fetchall()
    assert n == len(gdf) and total == pytest.approx(gdf.area_m2.sum())
    # The covering column answers a window query: objects whose box lies in the west half.
    x0, _, x1, _ = gdf.total_bounds
    mid = (x0 + x1) / 2
    [(west,)] = duckdb.sql(f"select count(*) from read_parquet('{path}') where bbox.xmax <= {mid}").fetchall()
    assert west == int((gdf.geometry.bounds.maxx <= mid).sum())


def test_cli_parquet_only_writes_no_geopackage(ray_session, tmp_path, oracle_config_path):
    scene = tmp_path / "only.tif"
    write_scene(scene, size=256, seed=22)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["-q", "run", str(scene), "--out", str(out), "--config", str(oracle_config_path), "--vectors", "parquet"]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    files = {p.name for p in (out / "only").iterdir()}
    assert not any(f.endswith(".gpkg") for f in files), files
    assert {f"only_{m}.{ext}" for m in MODELS for ext in ("tif", "qml", "parquet")} <= files
    summary = json.loads((out / "only" / "summary.json").read_text())  # the counts are still there
    ships = summary["models"]["ships"]["classes"]["ship"]["count"]
    assert len(gpd.read_parquet(out / "only" / "only_ships.parquet")) == ships
    assert len(geoseg.open_run(out).layer("only", "ships")) == ships  # the Python reader takes the Parquet


def test_bad_vectors_value_is_one_line(tmp_path, oracle_config_path, monkeypatch, capsys):
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "geoseg",
            "-q",
            "run",
            str(tmp_path / "x.tif"),
            "--out",
            str(tmp_path / "out"),
            "--config",
            str(oracle_config_path),
            "--vectors",
            "gpkg,shp",
        ],
    )
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.strip().splitlines() == ["error: --vectors: unknown vector format 'shp' (choose from gpkg, parquet)"]
    assert not (tmp_path / "out").exists()


def test_features_appended_through_sqlite_read_back_as_gdal_writes_them(tmp_path):
    """``LayerWriter`` creates a layer through GDAL and appends through sqlite3
    (``geoseg.outputs.export.append_features``): GDAL reads the same features, attributes, count
    and extent as from a layer it wrote itself, and its R-tree answers a bounding-box query."""
    from rasterio.crs import CRS

    from geoseg.outputs.export import INSTANCE_FIELDS, LayerWriter

    rng = np.random.default_rng(3)
    corners = rng.uniform(0, 1000, size=(40, 2)) + [500_000, 4_000_000]
    geoms = [shapely.box(x, y, x + w, y + h) for (x, y), (w, h) in zip(corners, rng.uniform(5, 60, size=(40, 2)))]
    geoms[7] = shapely.Polygon(geoms[7].exterior, [shapely.box(*geoms[7].centroid.buffer(1).bounds).exterior])
    geoms[9] = shapely.MultiPolygon([geoms[9], shapely.box(400_000, 3_999_000, 400_010, 3_999_010)])
    columns = {
        "instance_id": np.arange(1, 41),
        "class": ["building"] * 20 + ["ship"] * 20,
        "score": rng.uniform(0, 1, 40),
        "area_m2": np.array([g.area for g in geoms]),
        "length_m": rng.uniform(1, 9, 40),
        "width_m": rng.uniform(1, 9, 40),
        "orientation_deg": rng.uniform(0, 180, 40),
    }
    crs = CRS.from_epsg(32633).to_wkt()
    ours, gdal = tmp_path / "ours.gpkg", tmp_path / "gdal.gpkg"
    layer = LayerWriter(ours, "objects", crs, INSTANCE_FIELDS)
    for part in (slice(0, 10), slice(10, 25), slice(25, 40)):  # created by GDAL, then two appends
        layer.add_many(np.array(geoms[part], dtype=object), **{k: v[part] for k, v in columns.items()})
        layer.flush()
    reference = LayerWriter(gdal, "objects", crs, INSTANCE_FIELDS)
    reference.add_many(np.array(geoms, dtype=object), **columns)
    reference.flush()

    a, b = pyogrio.read_dataframe(ours), pyogrio.read_dataframe(gdal)
    assert len(a) == 40 and a.crs == b.crs
    assert all(shapely.equals_exact(a.geometry.values, b.geometry.values, tolerance=0))
    pd.testing.assert_frame_equal(a.drop(columns="geometry"), b.drop(columns="geometry"))
    assert pyogrio.read_info(ours)["features"] == 40
    box = (500_200, 4_000_200, 500_600, 4_000_700)
    hits = pyogrio.read_dataframe(ours, bbox=box)
    expected = [i + 1 for i, g in enumerate(geoms) if g.intersects(shapely.box(*box))]
    assert 0 < len(expected) < 40 and sorted(hits["instance_id"]) == expected
    with sqlite3.connect(ours) as db:
        extent = db.execute("SELECT min_x, min_y, max_x, max_y FROM gpkg_contents WHERE table_name = 'objects'")
        assert extent.fetchone() == pytest.approx(shapely.total_bounds(geoms))
        rtree = db.execute("SELECT count(*) FROM rtree_objects_geom").fetchone()[0]
    assert rtree == 40
