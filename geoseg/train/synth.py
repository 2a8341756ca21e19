"""Synthetic scenes with exact truth, at any size, written window by window.

A scene is a 3-band uint8 GeoTIFF (nodata 0) whose land use comes from smooth value noise and
whose objects (buildings on land, ships on water) are placed so that some cross tile seams, some
sit on four-tile corners and some are longer than a 1024-pixel tile. Beside ``OUT.tif`` it writes
``OUT.truth/landuse.tif`` (class per pixel, 255 nodata) and ``OUT.truth/objects.gpkg`` (layers
``buildings`` and ``ships``: the exact pixel footprint of every object).

Pixel colours come from a palette, so a per-pixel "oracle" model (``oracle_*`` below, 1x1
convolutions: context-free) recovers the truth exactly; tests use it to prove tiling invariance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import rasterio
import shapely
import torch
from affine import Affine
from rasterio.features import rasterize
from rasterio.windows import Window

from geoseg.outputs.export import LayerWriter
from geoseg.outputs.styles import hex_rgb
from geoseg.raster.read import SYNTHETIC_TAG
from geoseg.raster.vectorize import label_polygons, merge_parts, pixel_to_crs

LANDUSE_CLASSES = ["water", "forest", "cropland", "urban", "bare"]
LANDUSE_COLORS = ["#1e3c8c", "#1e6428", "#aaa03c", "#787878", "#be966e"]
BUILDING_RGB, CONTACT_RGB, SHIP_RGB = (220, 60, 50), (200, 30, 200), (240, 240, 240)
WATER, URBAN = 0, 3
NODATA = 0
WINDOW = 1024


PALETTE = np.array([hex_rgb(c) for c in LANDUSE_COLORS] + [BUILDING_RGB, CONTACT_RGB, SHIP_RGB], dtype=np.float32)
# Land-use class of each palette colour: buildings (and their contact lines) are urban, ships water.
PALETTE_CLASS = [0, 1, 2, 3, 4, URBAN, URBAN, WATER]


def _hash(seed: int, *keys: npt.ArrayLike) -> np.ndarray:
    """Deterministic uniform [0, 1) from integer keys (splitmix64 mixing)."""
    with np.errstate(over="ignore"):
        x = np.full(np.broadcast(*keys).shape, np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15), dtype=np.uint64)
        for k in keys:
            x = (x ^ np.asarray(k).astype(np.uint64)) * np.uint64(0xBF58476D1CE4E5B9)
            x ^= x >> np.uint64(31)
            x = x * np.uint64(0x94D049BB133111EB)
            x ^= x >> np.uint64(29)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def landuse_field(rows: np.ndarray, cols: np.ndarray, seed: int, cell: int) -> np.ndarray:
    """Land-use class at pixel (rows, cols): argmax over classes of bilinear value noise."""
    fr, fc = rows / cell, cols / cell
    i0, j0 = np.floor(fr).astype(np.int64), np.floor(fc).astype(np.int64)
    tr, tc = fr - i0, fc - j0
    best = np.full(np.broadcast(rows, cols).shape, -1.0)
    cls = np.zeros(best.shape, dtype=np.uint8)
    for k in range(len(LANDUSE_CLASSES)):
        v00, v01 = _hash(seed, k, i0, j0), _hash(seed, k, i0, j0 + 1)
        v10, v11 = _hash(seed, k, i0 + 1, j0), _hash(seed, k, i0 + 1, j0 + 1)
        v = (v00 * (1 - tc) + v01 * tc) * (1 - tr) + (v10 * (1 - tc) + v11 * tc) * tr
        cls = np.where(v > best, k, cls).astype(np.uint8)
        best = np.maximum(best, v)
    return cls


@dataclass(frozen=True)
class SynthObject:
    kind: str  # "building" | "ship"
    polygon: shapely.Geometry  # pixel coordinates (col, row)
    contact: shapely.Geometry | None = None  # pixels painted as a contact line (touching buildings)


def _rect(cx: float, cy: float, length: float, width: float, angle_deg: float) -> shapely.Geometry:
    box = shapely.box(-length / 2, -width / 2, length / 2, width / 2)
    a = np.radians(angle_deg)
    rot = shapely.transform(box, lambda xy: xy @ np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]))
    return shapely.transform(rot, lambda xy: xy + [cx, cy])


def plan_objects(size: int, seed: int, cell: int, touching_pairs: int = 0) -> list[SynthObject]:
    """Objects in pixel coordinates: seam and corner cases first, then a jittered grid. Objects
    never touch (3+ pixels apart), except the deliberate touching pairs."""
    rng = np.random.default_rng(seed)
    groups: list[list[SynthObject]] = []
    if size >= 1400:  # longer than a 1024 tile: a warehouse and a 300 m-class ship
        groups.append([SynthObject("building", shapely.box(100, 1010, 100 + min(size - 200, 1300), 1040))])
        groups.append([SynthObject("ship", _rect(size / 2, size - 300, min(size - 300, 1150), 24, 8))])
    for k in range(256, size - 16, 256):  # four-tile corners and seams of 256/512/1024 tiles
        groups.append([SynthObject("building", shapely.box(k - 7, k - 5, k + 9, k + 6))])
        groups.append([SynthObject("ship", _rect(k + 0.5, min(k + 128, size - 40), 30, 6, 60))])
    for t in range(touching_pairs):  # two buildings sharing a wall; the wall pixels are 'contact'
        x, y = 40 + (t * 97) % max(size - 120, 1), 60 + (t * 211) % max(size - 120, 1)
        groups.append(
            [
                SynthObject(
                    "building", shapely.box(x, y, x + 12, y + 14), contact=shapely.box(x + 11, y, x + 12, y + 14)
                ),
                SynthObject(
                    "building", shapely.box(x + 12, y, x + 26, y + 14), contact=shapely.box(x + 12, y, x + 13, y + 14)
                ),
            ]
        )
    step = 48
    for gy in range(0, size - step, step):
        for gx in range(0, size - step, step):
            if rng.random() < 0.35:
                continue
            cx, cy = gx + rng.uniform(18, step - 18), gy + rng.uniform(18, step - 18)
            cls = landuse_field(np.array(int(cy)), np.array(int(cx)), seed, cell)
            if cls == WATER:
                groups.append(
                    [SynthObject("ship", _rect(cx, cy, rng.uniform(10, 30), rng.uniform(3, 7), rng.uniform(0, 180)))]
                )
            elif cls == URBAN or rng.random() < 0.15:
                w, h = rng.uniform(6, 24), rng.uniform(6, 24)
                groups.append([SynthObject("building", shapely.box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))])
    inside = shapely.box(3, 3, size - 3, size - 3)
    kept: list[SynthObject] = []
    buckets: dict[tuple[int, int], list[shapely.Geometry]] = {}  # spatial hash: linear in object count
    for group in groups:  # accept a group whole, or not at all
        footprint = shapely.union_all([o.polygon for o in group])
        if not inside.contains(footprint):
            continue
        grown = footprint.buffer(3.0)
        x0, y0, x1, y1 = (int(v) // 64 for v in grown.bounds)
        keys = [(i, j) for i in range(x0, x1 + 1) for j in range(y0, y1 + 1)]
        if any(g.intersects(grown) for k in keys for g in buckets.get(k, ())):
            continue
        kept.extend(group)
        for key in keys:
            buckets.setdefault(key, []).append(footprint)
    return kept


def write_scene(
    path: str | Path,
    size: int = 2048,
    seed: int = 0,
    crs: str = "EPSG:32618",
    pixel_size: float = 1.0,
    cell: int = 160,
    noise: int = 6,
    nodata_corner: bool = True,
    touching_pairs: int = 0,
    origin: tuple[float, float] | None = None,
) -> list[SynthObject]:
    """Write a synthetic scene and its truth; returns the objects (pixel coordinates). ``origin``:
    the top-left corner in CRS units (default: near Washington DC in EPSG:4326, else (500000, 4300000))."""
    path = Path(path)
    truth_dir = path.with_suffix(".truth")
    truth_dir.mkdir(parents=True, exist_ok=True)
    if origin is not None:
        transform = Affine(pixel_size, 0, origin[0], 0, -pixel_size, origin[1])
    elif crs.upper() in ("EPSG:4326", "OGC:CRS84"):
        transform = Affine(pixel_size, 0, -77.0, 0, -pixel_size, 38.9)
    else:
        transform = Affine(pixel_size, 0, 500000.0, 0, -pixel_size, 4300000.0)
    objects = plan_objects(size, seed, cell, touching_pairs)
    tree = shapely.STRtree([o.polygon for o in objects])
    profile = dict(
        driver="GTiff",
        width=size,
        height=size,
        crs=crs,
        transform=transform,
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
    )
    tmp_img, tmp_lu = path.with_name(f".{path.name}.tmp"), truth_dir / ".landuse.tif.tmp"
    with (
        rasterio.open(tmp_img, "w", **profile, count=3, dtype="uint8", nodata=NODATA) as img,
        rasterio.open(tmp_lu, "w", **profile, count=1, dtype="uint8", nodata=255) as lu,
    ):
        for r0 in range(0, size, WINDOW):
            for c0 in range(0, size, WINDOW):
                win = Window(c0, r0, min(WINDOW, size - c0), min(WINDOW, size - r0))
                rgb, classes = _render_window(win, objects, tree, seed, cell, noise, nodata_corner, size)
                img.write(rgb, window=win)
                lu.write(classes, 1, window=win)
        lu.write_colormap(1, {i: (*hex_rgb(c), 255) for i, c in enumerate(LANDUSE_COLORS)})
        lu.update_tags(classes=",".join(LANDUSE_CLASSES))
        # Marks the scene as synthetic: a run of models trained only on such scenes warns on any
        # raster without this tag (geoseg.runner.pipeline), and `geoseg train` knows what it learned from.
        img.update_tags(**{SYNTHETIC_TAG: "1", "GEOSEG_SYNTH_SEED": str(seed)})
    os.replace(tmp_img, path)
    os.replace(tmp_lu, truth_dir / "landuse.tif")
    _write_truth_objects(truth_dir / "objects.gpkg", objects, transform, crs, size, nodata_corner)
    return objects


def _nodata_mask(rows: np.ndarray, cols: np.ndarray, size: int) -> np.ndarray:
    return rows + cols < size * 0.12


def _render_window(
    win: Window,
    objects: list[SynthObject],
    tree: shapely.STRtree,
    seed: int,
    cell: int,
    noise: int,
    nodata_corner: bool,
    size: int,
) -> tuple[np.ndarray, np.ndarray]:
    r0, c0, h, w = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
    rows, cols = np.mgrid[r0 : r0 + h, c0 : c0 + w]
    palette_idx = landuse_field(rows, cols, seed, cell).astype(np.uint8)
    shape = (h, w)
    to_win = Affine.translation(c0, r0)
    hits = tree.query(shapely.box(c0, r0, c0 + w, r0 + h))
    for i in hits:
        obj = objects[int(i)]
        colour = 5 if obj.kind == "building" else 7
        burn = rasterize([(obj.polygon, 1)], out_shape=shape, transform=to_win, fill=0, dtype="uint8")
        palette_idx[burn > 0] = colour
        if obj.contact is not None:
            line = rasterize([(obj.contact, 1)], out_shape=shape, transform=to_win, fill=0, dtype="uint8")
            palette_idx[(line > 0) & (burn > 0)] = 6
    jitter = (_hash(seed + 1, rows, cols)[None] * 2 - 1) * noise if noise else 0.0
    rgb = np.clip(PALETTE[palette_idx].transpose(2, 0, 1) + jitter, 1, 255).astype(np.uint8)
    classes = np.asarray(PALETTE_CLASS, dtype=np.uint8)[palette_idx]
    if nodata_corner:
        nd = _nodata_mask(rows, cols, size)
        rgb[:, nd] = NODATA
        classes[nd] = 255
    return rgb, classes


def _write_truth_objects(
    path: Path, objects: list[SynthObject], transform: Affine, crs: str, size: int, nodata_corner: bool
) -> None:
    """Exact pixel footprint of each object (what the raster shows), in the scene's CRS."""
    if path.exists():
        path.unlink()
    layers = {
        k: LayerWriter(
            path, k + "s", rasterio.crs.CRS.from_user_input(crs).to_wkt(), {"class": "str", "pixels": "int64"}
        )
        for k in ("building", "ship")
    }
    for obj in objects:
        minx, miny, maxx, maxy = (int(np.floor(v)) for v in obj.polygon.bounds)
        shape = (maxy - miny + 2, maxx - minx + 2)
        burn = rasterize(
            [(obj.polygon, 1)], out_shape=shape, transform=Affine.translation(minx, miny), fill=0, dtype="uint8"
        )
        if nodata_corner:
            rr, cc = np.mgrid[miny : miny + shape[0], minx : minx + shape[1]]
            burn[_nodata_mask(rr, cc, size)] = 0
        if not burn.any():
            continue
        _, parts = label_polygons(burn.astype(np.int32), miny, minx)
        geom = pixel_to_crs(merge_parts(parts), transform)
        layers[obj.kind].add(geom, **{"class": obj.kind, "pixels": int(burn.sum())})
    for layer in layers.values():
        layer.flush()


class PaletteOracle(torch.nn.Module):
    """Per-pixel (1x1) model: the nearest palette colour decides. Context-free by construction.

    ``groups[k]`` lists the palette colours of output channel k; a channel's logit is its best
    colour's score minus the best score of any other colour (positive iff the pixel is in the group).
    """

    def __init__(self, groups: list[list[int]], margin_logits: bool) -> None:
        super().__init__()
        self.score = torch.nn.Conv2d(3, PALETTE.shape[0], 1)
        with torch.no_grad():
            p = torch.from_numpy(PALETTE)
            self.score.weight.copy_((2 * p).view(-1, 3, 1, 1))
            assert self.score.bias is not None  # Conv2d has a bias by default
            self.score.bias.copy_(-(p * p).sum(1))
        self.groups = groups
        self.margin_logits = margin_logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exact only in float32 whatever the run's precision: the scores reach 1e5, where bf16 keeps
        # two or three significant digits.
        with torch.autocast(x.device.type, enabled=False):
            s = self.score(x.float()) / 100.0
        outs = []
        for group in self.groups:
            inside = s[:, group].amax(dim=1)
            if self.margin_logits:
                others = [i for i in range(PALETTE.shape[0]) if i not in group]
                outs.append(inside - s[:, others].amax(dim=1))
            else:
                outs.append(inside)
        return torch.stack(outs, dim=1)


def oracle_landuse() -> torch.nn.Module:
    """Semantic oracle over the 5 land-use classes (raw uint8 input, ``normalize: none``)."""
    return PaletteOracle([[i for i, c in enumerate(PALETTE_CLASS) if c == k] for k in range(5)], margin_logits=False)


def oracle_buildings() -> torch.nn.Module:
    """One-channel instance oracle: body = building or contact colour."""
    return PaletteOracle([[5, 6]], margin_logits=True)


def oracle_buildings_3ch() -> torch.nn.Module:
    """Three-channel instance oracle: body, border (never), contact = contact-line colour."""
    return _ThreeChannel(PaletteOracle([[5, 6], [6]], margin_logits=True))


def oracle_ships() -> torch.nn.Module:
    """One-channel instance oracle: body = ship colour."""
    return PaletteOracle([[7]], margin_logits=True)


class _ThreeChannel(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        body_contact = self.inner(x)
        border = torch.full_like(body_contact[:, :1], -20.0)
        return torch.cat([body_contact[:, :1], border, body_contact[:, 1:]], dim=1)
