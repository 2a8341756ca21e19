"""Scoring a trained model on its held-out part: sliding-window probabilities over an in-memory image,
tiled and padded exactly as ``geoseg run`` tiles a raster, and the scores per place (mean IoU for
semantic heads, matched objects for instance heads)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from geoseg.core.heads import ModelConfig
from geoseg.models.blend import blend_image
from geoseg.raster.grid import padded_size, plan_tiles
from geoseg.raster.windows import head_windows
from geoseg.train.config import TrainConfig
from geoseg.train.data import Scene, holdout_rows
from geoseg.train.evaluate import confusion, match_instances, semantic_scores


@torch.inference_mode()
def predict_region(
    model: torch.nn.Module,
    spec: ModelConfig,
    image: np.ndarray,
    tile_size: int,
    halo: int,
    tta: str = "none",
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """Sliding-window probabilities (K x H x W float32) over an in-memory image, tiled and padded
    exactly as ``geoseg run`` tiles and pads a raster."""
    from geoseg.models.forward import WIDEN, mask_invalid, normalize, predict_probs
    from geoseg.raster.grid import pad_to_square

    _, h, w = image.shape
    side = padded_size(tile_size, halo)
    out = np.zeros((spec.out_channels, h, w), dtype=np.float32)
    for tile in plan_tiles(w, h, tile_size, halo):
        win = image[
            :,
            int(tile.read.row_off) : int(tile.read.row_off + tile.read.height),
            int(tile.read.col_off) : int(tile.read.col_off + tile.read.width),
        ]
        arr = pad_to_square(win, tile, halo, side)
        arr = arr.astype(WIDEN.get(arr.dtype, arr.dtype), copy=False)
        x = normalize(torch.from_numpy(np.ascontiguousarray(arr))[None].float(), spec)
        if valid is not None:
            vwin = valid[
                int(tile.read.row_off) : int(tile.read.row_off + tile.read.height),
                int(tile.read.col_off) : int(tile.read.col_off + tile.read.width),
            ]
            if not vwin.any():
                continue  # no imagery: nothing to predict (the run writes nodata there)
            x = mask_invalid(x, torch.from_numpy(pad_to_square(vwin[None], tile, halo, side))) if not vwin.all() else x
        probs = predict_probs(model, x, spec, tta)[0].numpy()
        r0, c0 = int(tile.core.row_off), int(tile.core.col_off)
        hh, ww = int(tile.core.height), int(tile.core.width)
        out[:, r0 : r0 + hh, c0 : c0 + ww] = probs[:, halo : halo + hh, halo : halo + ww]
    return out


def evaluate(cfg: TrainConfig, spec: ModelConfig, model: torch.nn.Module, scenes: list[Scene]) -> dict[str, Any]:
    """Held-out scores, over all held-out places and per place (``places``): pixel IoU per class
    (semantic) or object P/R/F1 at IoU ``eval_iou`` and body IoU (instance). Objects and pixels
    count only where the image has data (its mask)."""
    from geoseg.models.decode import decode_instances
    from geoseg.train.evaluate import prf

    model = model.eval()
    n = len(cfg.classes)
    acc: dict[str, dict[str, Any]] = {}
    for s in scenes:
        if s.spec.split == "train":
            continue
        a = acc.setdefault(
            s.place,
            {
                "cm": np.zeros((n, n + 1), np.int64),
                "body": np.zeros((2, 3), np.int64),
                "tp": 0,
                "pred": 0,
                "truth": 0,
                "pixels": 0,
                "scenes": 0,
            },
        )
        rows = holdout_rows(s)
        image, target, valid = s.image[:, rows], s.target[rows], s.valid[rows]
        a["pixels"] += int(valid.sum())
        a["scenes"] += 1
        tta = spec.tta or "none"  # a head's own test-time augmentation, as the run applies it
        if cfg.eval_blend == "hann":
            hw = head_windows(cfg.eval_window, cfg.eval_overlap, 1.0, image.shape[-1], image.shape[-2])
            probs = blend_image(model, spec, image, valid, hw, tta)
        else:
            probs = predict_region(model, spec, image, cfg.eval_tile_size, cfg.eval_halo, tta, valid=valid)
        if cfg.task == "semantic":
            a["cm"] += confusion(probs.argmax(0), target, n, valid)
        else:
            a["body"] += confusion(
                (probs[0] > spec.threshold).astype(np.uint8), (target > 0).astype(np.uint8), 2, valid
            )
            labels = decode_instances((probs * 255).round().astype(np.uint8), valid, spec)
            if spec.min_area_m2 > 0:  # as the run's export drops them (area on the ground)
                sizes = np.bincount(labels.ravel()) * _pixel_m(cfg, s) ** 2
                labels = np.where(sizes[labels] >= spec.min_area_m2, labels, 0)
            truth = np.where(valid, target, 0)
            m = match_instances(labels, truth, cfg.eval_iou)
            a["tp"], a["pred"], a["truth"] = a["tp"] + m["matched"], a["pred"] + m["predicted"], a["truth"] + m["truth"]

    def scores(a: dict[str, Any]) -> dict[str, Any]:
        if cfg.task == "semantic":
            return {"pixels": a["pixels"], **semantic_scores(a["cm"], cfg.classes)}
        body = semantic_scores(a["body"], ["background", cfg.classes[0]])
        return {
            "pixels": a["pixels"],
            "objects": prf(a["tp"], a["pred"], a["truth"], cfg.eval_iou),
            "body_iou": body["iou"][cfg.classes[0]],
        }

    total = {
        "cm": sum(a["cm"] for a in acc.values()),
        "body": sum(a["body"] for a in acc.values()),
        **{k: sum(a[k] for a in acc.values()) for k in ("tp", "pred", "truth", "pixels")},
    }
    out = {"split": "held-out", **scores(total)}
    if len(acc) > 1 or any(s.spec.place for s in scenes if s.spec.split != "train"):
        out["places"] = {place: {"scenes": a["scenes"], **scores(a)} for place, a in sorted(acc.items())}
    return out


def _pixel_m(cfg: TrainConfig, s: Scene) -> float:
    """Ground size (m) of a pixel of a scene as held in memory."""
    if cfg.resample_m is not None:
        return cfg.resample_m
    if s.spec.pixel_size_m is not None:
        return s.spec.pixel_size_m
    from geoseg.core.contract import scene_gsd_m

    h, w = s.valid.shape
    return scene_gsd_m(s.crs.to_wkt(), s.transform, w, h)
