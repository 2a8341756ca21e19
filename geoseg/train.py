"""``geoseg train``: GeoTIFFs + labels -> a model directory that ``geoseg run`` loads as it is.

Steps: read each scene (and its labels) into memory, split it into train and held-out parts
(whole scenes, or a band of rows), cut chips with ``geoseg.grid.plan_tiles`` and pad them as the
predictor does, build targets (class per pixel; or body / border / contact from polygons), train
on Ray Train (``TorchTrainer``, one worker, a GPU when there is one), then score the held-out part
with sliding-window inference over the same tiling and write ``config.json`` +
``model.safetensors`` (fp16) + ``geoseg.json`` (input contract and metrics).

Training scenes are meant to be small (they are held in memory): chip a large raster first.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import rasterio
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rasterio.features import rasterize
from scipy import ndimage

from geoseg.config import InstanceChannel, ModelConfig, Normalize, read_yaml_mapping
from geoseg.contract import resolve, save_contract
from geoseg.errors import ConfigError, InputError
from geoseg.evaluate import IGNORE, confusion, match_instances, semantic_scores
from geoseg.grid import Tile, padded_size, plan_tiles

log = logging.getLogger("geoseg.train")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SynthSource(_Strict):
    """A scene written by ``geoseg synth`` at training time (reproducible from size and seed)."""

    size: int = Field(1024, ge=64)
    seed: int = 0
    touching_pairs: int = 0


class Holdout(_Strict):
    """Rows ``[start, end)`` (fractions of the height) held out of training and scored."""

    rows: tuple[float, float] = (0.75, 1.0)


class SceneSpec(_Strict):
    """One training scene: an image (one file, or one file per band, stacked) or a synthetic scene,
    and its labels: a label raster, polygons (GeoPackage / GeoJSON / shapefile), COCO JSON (pixel
    RLE masks, as the Sentinel-2 ships), or a synthetic scene's truth (``landuse``/``buildings``/``ships``)."""

    image: str | list[str] | None = None
    synth: SynthSource | None = None
    labels: str
    layer: str | None = None  # vector layer (GeoPackage)
    class_field: str | None = None  # semantic polygons: attribute holding the class name
    class_values: dict[int, str] | None = None  # label raster value -> class name (others ignored)
    split: Literal["train", "holdout", "both"] = "train"  # 'both': holdout rows below, training above
    holdout: Holdout = Holdout()

    @model_validator(mode="after")
    def _one_image(self) -> "SceneSpec":
        if (self.image is None) == (self.synth is None):
            raise ValueError("set exactly one of 'image' and 'synth'")
        return self


class ArchSpec(_Strict):
    arch: str = "Unet"
    encoder: str = "tu-resnet10t"
    arch_params: dict[str, Any] = {"encoder_depth": 3, "decoder_channels": [64, 32, 16]}


class AutoNormalize(_Strict):
    """Normalisation computed on the training pixels: per-band mean/std, percentile clip, or dB."""

    auto: Literal["meanstd", "clip", "db"]
    percentiles: tuple[float, float] = (2.0, 98.0)


class TrainParams(_Strict):
    steps: int = Field(300, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    seed: int = 0
    threads: int = Field(1, ge=1)  # torch threads per worker on the CPU
    positive_weight: float = Field(3.0, ge=1)  # instance tasks: chips with objects are drawn this much more often
    # semantic tasks: weight the loss of each class by 1/sqrt(its training pixels) (rare classes count more)
    class_weighting: Literal["none", "inverse_sqrt"] = "none"
    num_workers: int = Field(1, ge=1)


class TrainConfig(_Strict):
    """A training run: what to learn, from which scenes, and where the model directory goes."""

    name: str
    out: str
    task: Literal["semantic", "instance"]
    classes: list[str] = Field(min_length=1)
    colors: list[str] | None = None
    channels: list[InstanceChannel] = ["body"]
    bands: list[int] = Field(min_length=1)
    band_names: list[str] | None = None
    gsd_m: float | None = None  # default: the first scene's
    normalize: Union[AutoNormalize, Normalize] = "none"
    model: ArchSpec = ArchSpec()
    scenes: list[SceneSpec] = Field(min_length=1)
    chip_size: int = Field(96, ge=16)  # core pixels per chip (plan_tiles' tile_size)
    chip_halo: int = Field(16, ge=0)  # context each side; chips are padded to a multiple of 32
    eval_tile_size: int = Field(256, ge=32)
    eval_halo: int = Field(32, ge=0)
    train: TrainParams = TrainParams()
    postprocess: dict[str, Any] = {}  # thresholds etc. stored in the contract (ModelConfig keys)
    data: str = ""  # data source, for the model card
    licence: str = ""
    base_dir: str = "."

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.task == "instance" and len(self.classes) != 1:
            raise ValueError("an instance model has exactly one class")
        if self.band_names is not None and len(self.band_names) != len(self.bands):
            raise ValueError(f"{len(self.band_names)} band_names for {len(self.bands)} bands")
        if not any(s.split != "train" for s in self.scenes):
            raise ValueError("no held-out data: give a scene 'split: holdout' or 'split: both'")
        if not any(s.split != "holdout" for s in self.scenes):
            raise ValueError("no training data: every scene is 'split: holdout'")
        return self

    @property
    def out_channels(self) -> int:
        return len(self.classes) if self.task == "semantic" else len(self.channels)


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a training YAML (relative paths resolve against its folder)."""
    path = Path(path)
    data = read_yaml_mapping(path)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            data[key] = {**(data.get(key) or {}), **{k: v for k, v in value.items() if v is not None}}
        elif value is not None:
            data[key] = value
    try:
        return TrainConfig.model_validate({**data, "base_dir": str(path.resolve().parent)})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[")))
        raise ConfigError(str(path), key, err["msg"].removeprefix("Value error, ")) from None


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


def _read_image(paths: list[Path], bands: list[int]) -> tuple[np.ndarray, np.ndarray, Any, Any, str]:
    arrays, masks = [], []
    transform = crs = None
    for p in paths:
        try:
            with rasterio.open(p) as ds:
                arrays.append(ds.read())
                masks.append(ds.read_masks() > 0)
                if transform is None:
                    transform, crs, shape = ds.transform, ds.crs, ds.shape
                elif ds.shape != shape:
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
    return image[idx].astype(common, copy=False), mask[idx].all(0), transform, crs, str(common)


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


def _target(cfg: TrainConfig, spec: SceneSpec, labels: Path, shape: tuple[int, int], transform: Any,
            crs: Any) -> np.ndarray:
    suffix = labels.suffix.lower()
    if suffix in (".tif", ".tiff", ".vrt"):
        with rasterio.open(labels) as ds:
            if ds.shape != shape:
                raise InputError(str(labels), f"label raster is {ds.shape}, the image {shape}; put them on one grid")
            raw = ds.read(1)
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
        from geoseg.synth import write_scene

        path = work_dir / f"synth_{spec.synth.size}_{spec.synth.seed}.tif"
        if not path.exists():
            write_scene(path, size=spec.synth.size, seed=spec.synth.seed, touching_pairs=spec.synth.touching_pairs)
        truth = path.with_suffix(".truth")
        paths = [path]
        labels, layer = (truth / "landuse.tif", None) if spec.labels == "landuse" else (truth / "objects.gpkg", spec.labels)
        spec = spec.model_copy(update={"layer": layer})
    else:
        images = [spec.image] if isinstance(spec.image, str) else list(spec.image or [])
        paths = [resolve(p, base) for p in images]
        labels = resolve(spec.labels, base)
    for p in (*paths, labels):
        if not p.exists():
            raise InputError(str(p), "no such file")
    image, valid, transform, crs, _ = _read_image(paths, cfg.bands)
    target = _target(cfg, spec, labels, image.shape[1:], transform, crs)
    return Scene(name=f"{index}:{paths[0].name}", image=image, target=target, valid=valid, transform=transform,
                 crs=crs, spec=spec)


def instance_targets(ids: np.ndarray, channels: list[str], contact_px: int = 2) -> np.ndarray:
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


def _holdout_rows(s: Scene) -> slice:
    h = s.image.shape[1]
    if s.spec.split == "both":
        a, b = s.spec.holdout.rows
        return slice(int(round(h * a)), int(round(h * b)))
    return slice(0, h)


def _pad(arr: np.ndarray, tile: Tile, halo: int, side: int, mode: str) -> np.ndarray:
    r0 = halo - int(tile.core.row_off - tile.read.row_off)
    c0 = halo - int(tile.core.col_off - tile.read.col_off)
    h, w = arr.shape[-2:]
    pads = [(0, 0)] * (arr.ndim - 2) + [(r0, side - r0 - h), (c0, side - c0 - w)]
    if mode == "reflect" and min(h, w) <= 1:
        mode = "edge"
    return np.pad(arr, pads, mode=mode)  # type: ignore[call-overload]


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
        h, w = valid.shape
        for tile in plan_tiles(w, h, min(cfg.chip_size, h, w), cfg.chip_halo):
            win = (slice(int(tile.read.row_off), int(tile.read.row_off + tile.read.height)),
                   slice(int(tile.read.col_off), int(tile.read.col_off + tile.read.width)))
            v = iv = valid[win]
            if cfg.task == "semantic":
                v = v & (target[win] != IGNORE)
            if not v.any():
                continue
            xs.append(_pad(image[(slice(None), *win)], tile, cfg.chip_halo, side, "reflect"))
            ys.append(_pad(target[(Ellipsis, *win)], tile, cfg.chip_halo, side, "reflect"))
            vs.append(_pad(v, tile, cfg.chip_halo, side, "constant"))
            ivs.append(_pad(iv, tile, cfg.chip_halo, side, "reflect"))  # as the predictor pads the image
    if not xs:
        raise InputError(cfg.name, "no training chip holds a labelled pixel")
    x = np.stack(xs)
    return {"x": x.astype(np.float32) if x.dtype.kind == "f" else x, "y": np.stack(ys), "valid": np.stack(vs),
            "image_valid": np.stack(ivs)}


# -------------------------------------------------------------------------------------- training


def _head_spec(cfg: TrainConfig, normalize: Any) -> ModelConfig:
    return ModelConfig.model_validate({
        "task": cfg.task, "classes": cfg.classes, "colors": cfg.colors, "bands": list(range(1, len(cfg.bands) + 1)),
        "normalize": normalize, "channels": cfg.channels, "factory": "geoseg.train:_unused", **cfg.postprocess,
    })


def _loss(logits: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, task: str,
          class_weights: torch.Tensor | None = None) -> torch.Tensor:
    if task == "semantic":
        y = torch.where(valid, y.long(), torch.full_like(y.long(), IGNORE))
        return torch.nn.functional.cross_entropy(logits, y, weight=class_weights, ignore_index=IGNORE)
    v = valid[:, None].float()
    yf = y.float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, yf, reduction="none")
    bce = (bce * v).sum() / v.sum().clamp(min=1) / logits.shape[1]
    # Soft dice per channel: border and contact are a few per cent of the pixels, BCE alone
    # learns to leave them out.
    p = torch.sigmoid(logits) * v
    t = yf * v
    dims = (0, 2, 3)
    dice = 1 - (2 * (p * t).sum(dims) + 1) / (p.sum(dims) + t.sum(dims) + 1)
    return bce + dice.mean()


def _augment(*tensors: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    k = int(torch.randint(0, 4, (1,), generator=gen))
    flip = bool(torch.randint(0, 2, (1,), generator=gen))
    out = []
    for t in tensors:
        t = torch.rot90(t, k, dims=(-2, -1))
        out.append(torch.flip(t, dims=(-1,)) if flip else t)
    return tuple(out)


def train_loop(loop_cfg: dict[str, Any]) -> None:
    """Ray Train worker: chips from the object store -> AdamW + one-cycle -> state dict checkpoint."""
    import os

    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from geoseg.infer import _normalize, mask_invalid
    from geoseg.models import create_smp

    torch.manual_seed(loop_cfg["seed"])
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(loop_cfg["threads"])
    chips = ray.get(loop_cfg["chips"])
    spec = ModelConfig.model_validate(loop_cfg["spec"])
    arch = loop_cfg["arch"]
    model = create_smp("train", arch["arch"], arch["encoder"], len(spec.bands), spec.out_channels, arch["arch_params"])
    model = ray.train.torch.prepare_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=loop_cfg["lr"], weight_decay=loop_cfg["weight_decay"])
    steps = loop_cfg["steps"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=loop_cfg["lr"], total_steps=steps, pct_start=0.15)
    x_all = torch.from_numpy(chips["x"].astype(np.float32))
    y_all, v_all = torch.from_numpy(chips["y"]), torch.from_numpy(chips["valid"])
    iv_all = torch.from_numpy(chips["image_valid"])
    cw = loop_cfg.get("class_weights")
    class_weights = torch.tensor(cw, dtype=torch.float32, device=device) if cw else None
    weights = torch.from_numpy(chips["weights"]).double()
    gen = torch.Generator().manual_seed(loop_cfg["seed"] + ray.train.get_context().get_world_rank())
    bs = loop_cfg["batch_size"]
    model.train()
    losses: list[float] = []
    use_amp = device.type == "cuda"
    for step in range(steps):
        idx = torch.multinomial(weights, bs, replacement=True, generator=gen)
        x, y, v, iv = _augment(x_all[idx], y_all[idx], v_all[idx], iv_all[idx], gen=gen)
        x, y, v, iv = x.to(device), y.to(device), v.to(device), iv.to(device)
        x = mask_invalid(_normalize(x, spec), iv)
        if use_amp:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(x)
        loss = _loss(logits.float(), y, v, spec.task, class_weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
        if (step + 1) % max(1, steps // 10) == 0 and ray.train.get_context().get_world_rank() == 0:
            print(f"step {step + 1}/{steps} loss {np.mean(losses[-20:]):.4f}", flush=True)
    metrics = {"train_loss": round(float(np.mean(losses[-20:])), 5), "steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            net = getattr(model, "module", model)
            torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, os.path.join(tmp, "state.pt"))
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def _fit(cfg: TrainConfig, spec: ModelConfig, chips: dict[str, np.ndarray], storage: Path) -> tuple[dict[str, Any], dict]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if cfg.task == "instance":
        positive = chips["y"][:, 0].reshape(len(chips["y"]), -1).any(1)
        chips["weights"] = np.where(positive, cfg.train.positive_weight, 1.0)
    else:
        chips["weights"] = np.ones(len(chips["x"]))
    class_weights = None
    if cfg.task == "semantic" and cfg.train.class_weighting == "inverse_sqrt":
        counts = np.array([((chips["y"] == k) & chips["valid"]).sum() for k in range(len(cfg.classes))], np.float64)
        w = np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1)), 0.0)
        class_weights = [round(float(v), 6) for v in w / w[w > 0].mean()]
    use_gpu = torch.cuda.is_available()
    loop_cfg = {
        "chips": ray.put(chips), "spec": spec.model_dump(), "arch": cfg.model.model_dump(), "steps": cfg.train.steps,
        "batch_size": cfg.train.batch_size, "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay,
        "seed": cfg.train.seed, "threads": cfg.train.threads, "class_weights": class_weights,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": 1}),
        run_config=RunConfig(storage_path=str(storage), name=cfg.name),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    assert result.checkpoint is not None
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    return dict(result.metrics or {}), state


# ------------------------------------------------------------------------------------ evaluation


@torch.inference_mode()
def predict_region(model: torch.nn.Module, spec: ModelConfig, image: np.ndarray, tile_size: int, halo: int,
                   tta: str = "none", valid: np.ndarray | None = None) -> np.ndarray:
    """Sliding-window probabilities (K x H x W float32) over an in-memory image, tiled and padded
    exactly as ``geoseg run`` tiles and pads a raster."""
    from geoseg.infer import _WIDEN, _normalize, mask_invalid, pad_to_square, predict_probs

    _, h, w = image.shape
    side = padded_size(tile_size, halo)
    out = np.zeros((spec.out_channels, h, w), dtype=np.float32)
    for tile in plan_tiles(w, h, tile_size, halo):
        win = image[:, int(tile.read.row_off): int(tile.read.row_off + tile.read.height),
                    int(tile.read.col_off): int(tile.read.col_off + tile.read.width)]
        arr = pad_to_square(win, tile, halo, side)
        arr = arr.astype(_WIDEN.get(arr.dtype, arr.dtype), copy=False)
        x = _normalize(torch.from_numpy(np.ascontiguousarray(arr))[None].float(), spec)
        if valid is not None:
            vwin = valid[int(tile.read.row_off): int(tile.read.row_off + tile.read.height),
                         int(tile.read.col_off): int(tile.read.col_off + tile.read.width)]
            x = mask_invalid(x, torch.from_numpy(pad_to_square(vwin[None], tile, halo, side))) if not vwin.all() else x
        probs = predict_probs(model, x, spec, tta)[0].numpy()
        r0, c0 = int(tile.core.row_off), int(tile.core.col_off)
        hh, ww = int(tile.core.height), int(tile.core.width)
        out[:, r0 : r0 + hh, c0 : c0 + ww] = probs[:, halo : halo + hh, halo : halo + ww]
    return out


def evaluate(cfg: TrainConfig, spec: ModelConfig, model: torch.nn.Module, scenes: list[Scene]) -> dict[str, Any]:
    """Held-out scores: pixel IoU per class (semantic) or object P/R/F1 at IoU 0.5 and body IoU (instance)."""
    from geoseg.decode import decode_instances

    model = model.eval()
    n = len(cfg.classes)
    cm = np.zeros((n, n + 1), dtype=np.int64)
    body_cm = np.zeros((2, 3), dtype=np.int64)
    tp = n_pred = n_truth = 0
    pixels = 0
    for s in scenes:
        if s.spec.split == "train":
            continue
        rows = _holdout_rows(s)
        image, target, valid = s.image[:, rows], s.target[rows], s.valid[rows]
        pixels += int(valid.sum())
        probs = predict_region(model, spec, image, cfg.eval_tile_size, cfg.eval_halo, valid=valid)
        if cfg.task == "semantic":
            cm += confusion(probs.argmax(0), target, n, valid)
        else:
            body_cm += confusion((probs[0] > spec.threshold).astype(np.uint8), (target > 0).astype(np.uint8), 2, valid)
            labels = decode_instances((probs * 255).round().astype(np.uint8), valid, spec)
            truth = np.where(valid, target, 0)
            m = match_instances(labels, truth)
            tp, n_pred, n_truth = tp + m["matched"], n_pred + m["predicted"], n_truth + m["truth"]
    if cfg.task == "semantic":
        return {"split": "held-out", "pixels": pixels, **semantic_scores(cm, cfg.classes)}
    from geoseg.evaluate import prf

    body = semantic_scores(body_cm, ["background", cfg.classes[0]])
    return {"split": "held-out", "pixels": pixels, "objects": prf(tp, n_pred, n_truth),
            "body_iou": body["iou"][cfg.classes[0]]}


# ------------------------------------------------------------------------------------ model dir


def _contract(cfg: TrainConfig, spec: ModelConfig, scenes: list[Scene], dtype: str) -> dict[str, Any]:
    from geoseg.contract import scene_gsd_m

    first = scenes[0]
    gsd = cfg.gsd_m
    if gsd is None:
        h, w = first.valid.shape
        gsd = float(f"{scene_gsd_m(first.crs.to_wkt(), first.transform, w, h):.3g}")
    contract: dict[str, Any] = {
        "name": cfg.name, "task": cfg.task, "classes": cfg.classes, "colors": cfg.colors,
        "bands": list(cfg.bands),
        "input": {"count": _source_count(cfg, first), "names": cfg.band_names, "dtype": dtype, "gsd_m": gsd},
        "normalize": spec.normalize if isinstance(spec.normalize, str) else spec.normalize.model_dump(exclude_none=True),
    }
    if cfg.task == "instance":
        contract["channels"] = cfg.channels
    contract.update(cfg.postprocess)
    return {k: v for k, v in contract.items() if v is not None}


def _source_count(cfg: TrainConfig, scene: Scene) -> int | None:
    if scene.spec.synth is not None:
        return 3
    images = [scene.spec.image] if isinstance(scene.spec.image, str) else list(scene.spec.image or [])
    if len(images) != 1:
        return None  # stacked from several files: the run reads a stack (VRT) built the same way
    with rasterio.open(resolve(images[0], cfg.base_dir)) as ds:
        return int(ds.count)


def write_model_dir(out: Path, cfg: TrainConfig, state: dict[str, torch.Tensor], contract: dict[str, Any]) -> Path:
    """``config.json`` + ``model.safetensors`` (fp16) via smp's save_pretrained, and ``geoseg.json``."""
    from geoseg.models import create_smp

    model = create_smp(cfg.name, cfg.model.arch, cfg.model.encoder, len(cfg.bands), cfg.out_channels,
                       cfg.model.arch_params)
    model.load_state_dict(state)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.half().save_pretrained(str(tmp))
    (tmp / "README.md").unlink(missing_ok=True)  # smp's card claims an MIT licence; geoseg.json is the card
    save_contract(tmp, contract)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def load_trained(out: Path, name: str = "model") -> tuple[ModelConfig, torch.nn.Module]:
    """Load a model directory as ``geoseg run`` does (contract defaults, smp weights)."""
    from geoseg.config import config_from_dict
    from geoseg.models import build_model

    config = config_from_dict({"models": {name: {"weights": str(out.resolve())}}})
    spec = config.models[name]
    return spec, build_model(name, spec, config.base_dir)


def train(cfg: TrainConfig, evaluate_only: bool = False, address: str | None = None) -> dict[str, Any]:
    """Train (or, with ``evaluate_only``, re-score the existing model) and return the contract."""
    started = time.monotonic()
    out = resolve(cfg.out, cfg.base_dir)
    with tempfile.TemporaryDirectory(prefix="geoseg-train-") as tmp:
        work = Path(tmp)
        scenes = [load_scene(cfg, s, work, i) for i, s in enumerate(cfg.scenes)]
        dtype = str(np.result_type(*[s.image.dtype for s in scenes]))
        if evaluate_only:
            spec, model = load_trained(out)
            metrics = evaluate(cfg, spec, model, scenes)
            contract = json.loads((out / "geoseg.json").read_text())
            return {**contract, "metrics": metrics}
        normalize = fit_normalize(cfg, scenes)
        spec = _head_spec(cfg, normalize)
        chips = make_chips(cfg, scenes)
        log.info("%s: %d chips of %d px from %d scene(s)", cfg.name, len(chips["x"]), chips["x"].shape[-1], len(scenes))
        from geoseg.pipeline import ensure_ray

        ensure_ray(address)
        fit_metrics, state = _fit(cfg, spec, chips, work / "ray")
        contract = _contract(cfg, spec, scenes, dtype)
        contract["training"] = {
            "config": cfg.name, "arch": cfg.model.model_dump(), "chips": int(len(chips["x"])),
            "chip_px": int(chips["x"].shape[-1]), "steps": cfg.train.steps, "batch_size": cfg.train.batch_size,
            "train_loss": fit_metrics.get("train_loss"), "device": "cuda" if torch.cuda.is_available() else "cpu",
            "seconds": round(time.monotonic() - started, 1),
        }
        if cfg.data:
            contract["data"] = cfg.data
        if cfg.licence:
            contract["licence"] = cfg.licence
        write_model_dir(out, cfg, state, contract)
        spec_loaded, model = load_trained(out)  # score what was written (fp16 weights), as run loads it
        contract["metrics"] = evaluate(cfg, spec_loaded, model, scenes)
        contract["size_bytes"] = sum(f.stat().st_size for f in out.iterdir())
        save_contract(out, {k: v for k, v in contract.items() if k != "geoseg_contract"})
        return contract


def summary_lines(contract: dict[str, Any]) -> list[str]:
    """Human lines for the held-out metrics of a contract."""
    m = contract.get("metrics") or {}
    if "iou" in m:
        per = ", ".join(f"{c} {v:.3f}" if v is not None else f"{c} -" for c, v in m["iou"].items())
        return [f"held-out mean IoU {m['mean_iou']}, pixel accuracy {m['pixel_accuracy']} ({per})"]
    if "objects" in m:
        o = m["objects"]
        return [f"held-out objects: {o['predicted']} predicted / {o['truth']} true, precision {o['precision']:.3f}, "
                f"recall {o['recall']:.3f}, F1 {o['f1']:.3f} at IoU 0.5; body IoU {m['body_iou']}"]
    return []


__all__ = ["TrainConfig", "load_train_config", "train", "evaluate", "instance_targets", "make_chips",
           "predict_region", "write_model_dir", "load_trained", "summary_lines"]
