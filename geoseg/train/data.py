"""Training data for ``geoseg train``: scenes and labels in memory, targets, fixed normalisation, chips.

Chips are cut with ``geoseg.raster.grid.plan_tiles`` and padded as the predictor pads tiles, so a model
sees at training time exactly what ``geoseg run`` feeds it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import rasterio
from affine import Affine
from rasterio.features import rasterize
from scipy import ndimage

from geoseg.core.contract import resolve
from geoseg.core.errors import ConfigError, InputError
from geoseg.core.heads import InstanceChannel
from geoseg.raster.grid import pad_to_square, padded_size, plan_tiles
from geoseg.train.config import AutoNormalize, SceneSpec, TrainConfig
from geoseg.train.evaluate import IGNORE

# --------------------------------------------------------------------------- scenes and targets


@dataclass
class Scene:
    """One scene in memory: image (C x H x W, raster dtype), target, validity."""

    name: str
    image: np.ndarray
    target: np.ndarray  # semantic: H x W uint8 class (255 ignore); instance: H x W int32 object ids
    valid: np.ndarray  # H x W bool: image pixels present
    transform: Any
    crs: Any
    spec: SceneSpec
    place: str = ""


def _open(path: Path) -> Any:
    with warnings.catch_warnings():  # a JPEG or PNG without a georeference is fine with pixel_size_m
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        return rasterio.open(path)


def _pixel_size(ds: Any, spec: SceneSpec | None) -> float | None:
    """Ground pixel size (m) of a raster: the scene's ``pixel_size_m``, else from its georeference."""
    if spec is not None and spec.pixel_size_m is not None:
        return spec.pixel_size_m
    if ds.crs is None:
        return None
    from geoseg.core.contract import scene_gsd_m

    return scene_gsd_m(ds.crs.to_wkt(), ds.transform, ds.width, ds.height)


def _resampled_shape(ds: Any, spec: SceneSpec | None, resample_m: float | None) -> tuple[int, int] | None:
    """``(height, width)`` at ``resample_m`` metres per pixel, or None to read the raster as it is."""
    if resample_m is None:
        return None
    gsd = _pixel_size(ds, spec)
    if gsd is None:
        raise InputError(ds.name, "no georeference: set the scene's pixel_size_m to resample it")
    factor = gsd / resample_m
    if abs(factor - 1) < 0.01:
        return None
    return max(1, int(round(ds.height * factor))), max(1, int(round(ds.width * factor)))


def _read_image(
    paths: list[Path], bands: list[int], spec: SceneSpec | None = None, resample_m: float | None = None
) -> tuple[np.ndarray, np.ndarray, Any, Any, str]:
    """Bands, validity, transform and CRS of a scene (one file or one file per band), resampled to
    ``resample_m`` (average of the source pixels; validity by nearest neighbour) when given."""
    from rasterio.enums import Resampling

    arrays, masks = [], []
    transform = crs = None
    for p in paths:
        try:
            with _open(p) as ds:
                out = _resampled_shape(ds, spec, resample_m)
                if out is None:
                    arrays.append(ds.read())
                    masks.append(ds.read_masks() > 0)
                    tr = ds.transform
                else:
                    arrays.append(ds.read(out_shape=(ds.count, *out), resampling=Resampling.average))
                    masks.append(ds.read_masks(out_shape=(ds.count, *out), resampling=Resampling.nearest) > 0)
                    tr = ds.transform @ Affine.scale(ds.width / out[1], ds.height / out[0])
                if transform is None:
                    transform, crs, shape = tr, ds.crs, arrays[-1].shape[1:]
                elif arrays[-1].shape[1:] != shape:
                    raise InputError(str(p), f"{ds.shape} pixels, the first file of this scene has {shape}")
        except rasterio.errors.RasterioIOError as exc:
            raise InputError(str(p), f"not a readable raster ({str(exc).splitlines()[0]})") from None
    image = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    mask = np.concatenate(masks) if len(masks) > 1 else masks[0]
    if max(bands) > image.shape[0]:
        raise InputError(str(paths[0]), f"{image.shape[0]} band(s), the training config reads bands {bands}")
    dtypes = {a.dtype for a in arrays}
    common = np.result_type(*dtypes)
    idx = [b - 1 for b in bands]
    # all over the band axis of a 3-D mask is an array (numpy types it np.bool | NDArray[np.bool]).
    return image[idx].astype(common, copy=False), cast(np.ndarray, mask[idx].all(0)), transform, crs, str(common)


def _read_polygons(path: Path, layer: str | None, crs: Any, field: str | None) -> tuple[list[Any], list[Any]]:
    import pyogrio
    import shapely
    from pyproj import CRS, Transformer

    meta, _, geometry, field_data = pyogrio.raw.read(path, layer=layer)
    geoms = shapely.from_wkb(geometry)
    values: list[Any] = [None] * len(geoms)
    if field is not None:
        names = list(meta["fields"])
        if field not in names:
            raise InputError(str(path), f"no attribute '{field}' (has {', '.join(names)})")
        values = list(field_data[names.index(field)])
    src = meta.get("crs")
    if src and crs is not None and CRS.from_user_input(src) != CRS.from_user_input(crs):
        tr = Transformer.from_crs(CRS.from_user_input(src), CRS.from_user_input(crs), always_xy=True)
        geoms = shapely.transform(geoms, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))
    keep = [i for i, g in enumerate(geoms) if g is not None and not g.is_empty]
    return [geoms[i] for i in keep], [values[i] for i in keep]


def _coco_ids(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Instance ids from a COCO JSON with uncompressed RLE masks (column-major runs)."""
    import ast

    data = json.loads(path.read_text())
    ids = np.zeros(shape, dtype=np.int32)
    for k, ann in enumerate(data.get("annotations", []), start=1):
        seg = ann["segmentation"]
        seg = ast.literal_eval(seg) if isinstance(seg, str) else seg
        if not isinstance(seg, dict) or not isinstance(seg.get("counts"), list):
            raise InputError(str(path), "only uncompressed RLE segmentations are read")
        h, w = seg["size"]
        if (h, w) != shape:
            raise InputError(str(path), f"masks are {h}x{w}, the image is {shape[0]}x{shape[1]}")
        flat = np.zeros(h * w, dtype=bool)
        pos, on = 0, False
        for run in seg["counts"]:
            if on:
                flat[pos : pos + run] = True
            pos += run
            on = not on
        ids[flat.reshape((w, h)).T & (ids == 0)] = k
    return ids


def _color_labels(cfg: TrainConfig, spec: SceneSpec, labels: Path, shape: tuple[int, int]) -> np.ndarray:
    """Class indices from a colour-coded label image (``label_colors``: hex -> class; other colours ignored)."""
    from PIL import Image

    from geoseg.outputs.styles import hex_rgb

    with Image.open(labels) as im:
        rgb = np.asarray(im.convert("RGB"))
    if rgb.shape[:2] != tuple(shape):
        if cfg.resample_m is None:
            raise InputError(str(labels), f"label image is {rgb.shape[:2]}, the image {shape}; put them on one grid")
        with Image.open(labels) as im:  # nearest neighbour keeps the colours exact
            # Pillow sets Image.NEAREST with setattr, so its types lack it (Image.Resampling needs pillow>=9.1).
            rgb = np.asarray(im.convert("RGB").resize((shape[1], shape[0]), Image.NEAREST))  # type: ignore[attr-defined]
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    out = np.full(shape, IGNORE, dtype=np.uint8)
    for color, name in (spec.label_colors or {}).items():
        if name not in cfg.classes:
            raise ConfigError(str(labels), "label_colors", f"'{name}' is not one of {cfg.classes}")
        r, g, b = hex_rgb(color)
        out[code == ((r << 16) | (g << 8) | b)] = cfg.classes.index(name)
    return out


def _target(
    cfg: TrainConfig, spec: SceneSpec, labels: Path, shape: tuple[int, int], transform: Any, crs: Any
) -> np.ndarray:
    suffix = labels.suffix.lower()
    if spec.label_colors is not None:
        return _color_labels(cfg, spec, labels, shape)
    if suffix in (".tif", ".tiff", ".vrt"):
        with rasterio.open(labels) as ds:
            if ds.shape != shape and cfg.resample_m is None:
                raise InputError(str(labels), f"label raster is {ds.shape}, the image {shape}; put them on one grid")
            from rasterio.enums import Resampling

            raw = ds.read(1, out_shape=shape, resampling=Resampling.nearest)
            nodata = ds.nodata
        if cfg.task != "semantic":
            return raw.astype(np.int32)  # an instance id raster
        out = np.full(shape, IGNORE, dtype=np.uint8)
        mapping = spec.class_values or {k: c for k, c in enumerate(cfg.classes)}
        for value, name in mapping.items():
            if name not in cfg.classes:
                raise ConfigError(str(labels), "class_values", f"'{name}' is not one of {cfg.classes}")
            out[(raw == value) & (raw != nodata if nodata is not None else True)] = cfg.classes.index(name)
        return out
    if suffix == ".json" and "coco" in labels.name.lower():
        if cfg.resample_m is not None:
            raise ConfigError(str(labels), "resample_m", "COCO pixel masks are not resampled: drop resample_m")
        return _coco_ids(labels, shape)
    geoms, values = _read_polygons(labels, spec.layer, crs, spec.class_field if cfg.task == "semantic" else None)
    if cfg.task == "semantic":
        out = np.full(shape, IGNORE, dtype=np.uint8)
        shapes = [(g, cfg.classes.index(v)) for g, v in zip(geoms, values) if v in cfg.classes]
        if shapes:
            out = rasterize(shapes, out_shape=shape, transform=transform, fill=IGNORE, dtype="uint8")
        return out
    ids = np.zeros(shape, dtype=np.int32)
    for k, g in enumerate(geoms, start=1):  # one by one: touching objects keep their own pixels
        burn = rasterize([(g, 1)], out_shape=shape, transform=transform, fill=0, dtype="uint8") > 0
        ids[burn & (ids == 0)] = k
    return ids


def load_scene(cfg: TrainConfig, spec: SceneSpec, work_dir: Path, index: int) -> Scene:
    """Read one scene and its target into memory (writing the synthetic scene first)."""
    base = cfg.base_dir
    if spec.synth is not None:
        from geoseg.train.synth import write_scene

        path = work_dir / f"synth_{spec.synth.size}_{spec.synth.seed}.tif"
        if not path.exists():
            write_scene(path, size=spec.synth.size, seed=spec.synth.seed, touching_pairs=spec.synth.touching_pairs)
        truth = path.with_suffix(".truth")
        paths = [path]
        labels, layer = (
            (truth / "landuse.tif", None) if spec.labels == "landuse" else (truth / "objects.gpkg", spec.labels)
        )
        spec = spec.model_copy(update={"layer": layer})
    else:
        images = [spec.image] if isinstance(spec.image, str) else list(spec.image or [])
        paths = [resolve(p, base) for p in images]
        labels = resolve(spec.labels, base)
    for p in (*paths, labels):
        if not p.exists():
            raise InputError(str(p), "no such file")
    image, valid, transform, crs, _ = _read_image(paths, cfg.bands, spec, cfg.resample_m)
    target = _target(cfg, spec, labels, image.shape[1:], transform, crs)
    return Scene(
        name=f"{index}:{paths[0].name}",
        image=image,
        target=target,
        valid=valid,
        transform=transform,
        crs=crs,
        spec=spec,
        place=spec.place or paths[0].stem,
    )


def instance_targets(ids: np.ndarray, channels: list[InstanceChannel], contact_px: int = 2) -> np.ndarray:
    """``K x H x W`` uint8 targets from object ids: body; border (the object's outer pixel ring);
    contact (pixels within ``contact_px`` of two different objects: the gaps that separate them)."""
    body = ids > 0
    out = [body]
    if channels != ["body"]:
        border = body & ((ndimage.minimum_filter(ids, size=3) != ids) | (ndimage.maximum_filter(ids, size=3) != ids))
        big = np.iinfo(np.int32).max
        size = 2 * contact_px + 1
        hi = ndimage.maximum_filter(ids, size=size)
        lo = ndimage.minimum_filter(np.where(body, ids, big), size=size)
        contact = (lo < big) & (hi != lo)
        out = [body, border, contact]
    return np.stack(out).astype(np.uint8)


# ------------------------------------------------------------------------------- normalisation


def fit_normalize(cfg: TrainConfig, scenes: list[Scene]) -> Any:
    """The configured normalisation; ``auto`` ones are computed on training pixels (valid ones)."""
    if not isinstance(cfg.normalize, AutoNormalize):
        return cfg.normalize
    rng = np.random.default_rng(0)
    samples = []
    for s in scenes:
        if s.spec.split == "holdout":
            continue
        rows = _train_rows(s)
        img, valid = s.image[:, rows], s.valid[rows]
        px = img[:, valid].astype(np.float64)
        if px.shape[1] > 200_000:
            px = px[:, rng.choice(px.shape[1], 200_000, replace=False)]
        samples.append(px)
    px = np.concatenate(samples, axis=1)
    auto = cfg.normalize
    if auto.auto == "meanstd":
        return {"mean": _r(px.mean(1)), "std": _r(np.maximum(px.std(1), 1e-6))}
    if auto.auto == "clip":
        lo, hi = np.percentile(px, auto.percentiles, axis=1)
        return {"clip_low": _r(lo), "clip_high": _r(np.maximum(hi, lo + 1e-6)), "percentiles": list(auto.percentiles)}
    db = 10 * np.log10(np.maximum(px, 1e-6))
    return {"db": True, "mean": _r(db.mean(1)), "std": _r(np.maximum(db.std(1), 1e-6))}


def _r(values: np.ndarray) -> list[float]:
    return [float(f"{v:.6g}") for v in values]


# ------------------------------------------------------------------------------------- chipping


def _train_rows(s: Scene) -> slice:
    h = s.image.shape[1]
    if s.spec.split == "both":
        return slice(0, int(round(h * s.spec.holdout.rows[0])))
    return slice(0, h)


def holdout_rows(s: Scene) -> slice:
    h = s.image.shape[1]
    if s.spec.split == "both":
        a, b = s.spec.holdout.rows
        return slice(int(round(h * a)), int(round(h * b)))
    return slice(0, h)


def make_chips(cfg: TrainConfig, scenes: list[Scene]) -> dict[str, np.ndarray]:
    """Training chips: plan_tiles over each scene's training rows, padded as the predictor pads.

    Returns ``x`` (N x C x S x S, raster dtype), ``y`` (semantic N x S x S uint8, 255 ignore;
    instance N x K x S x S uint8), ``valid`` (N x S x S bool, where the loss counts: padding, nodata
    and unlabelled pixels are False) and ``image_valid`` (N x S x S bool, pixels with data).
    """
    side = padded_size(cfg.chip_size, cfg.chip_halo)
    xs, ys, vs, ivs = [], [], [], []
    for s in scenes:
        if s.spec.split == "holdout":
            continue
        rows = _train_rows(s)
        image, target, valid = s.image[:, rows], s.target[rows], s.valid[rows]
        if cfg.task == "instance":
            target = instance_targets(target, cfg.channels)
        # A second grid shifted by half a chip sees it as its own image (from the shift on).
        for off in [0] if cfg.train.chip_grids == 1 else [0, cfg.chip_size // 2]:
            img, tgt, val = image[:, off:, off:], target[..., off:, off:], valid[off:, off:]
            h, w = val.shape
            if min(h, w) < 1:
                continue
            for tile in plan_tiles(w, h, min(cfg.chip_size, h, w), cfg.chip_halo):
                win = (
                    slice(int(tile.read.row_off), int(tile.read.row_off + tile.read.height)),
                    slice(int(tile.read.col_off), int(tile.read.col_off + tile.read.width)),
                )
                v = iv = val[win]
                if cfg.task == "semantic":
                    v = v & (tgt[win] != IGNORE)
                if not v.any():
                    continue
                xs.append(pad_to_square(img[(slice(None),) + win], tile, cfg.chip_halo, side))
                ys.append(pad_to_square(tgt[(Ellipsis,) + win], tile, cfg.chip_halo, side))
                vs.append(pad_to_square(v, tile, cfg.chip_halo, side, "constant"))
                ivs.append(pad_to_square(iv, tile, cfg.chip_halo, side))  # as the predictor pads the image
    if not xs:
        raise InputError(cfg.name, "no training chip holds a labelled pixel")
    x = np.stack(xs)
    return {
        "x": x.astype(np.float32) if x.dtype.kind == "f" else x,
        "y": np.stack(ys),
        "valid": np.stack(vs),
        "image_valid": np.stack(ivs),
    }
