"""Blended inference in the model actor: each head runs on its scene's window grid over a tile's read
window, and the windows' probabilities are averaged with fading weights (``geoseg.raster.windows``).

A window's output is kept (uint8 probabilities on the model's grid) in a cache bounded in bytes, so
a window that neighbouring tiles share runs once when they come to the same actor; tiles come row
by row, so the windows of the row above are usually still there. Correctness never depends on the
cache: a window not found is computed again, the same way.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from geoseg.core.heads import MeanStdNormalize, ModelConfig
from geoseg.models.forward import WIDEN, mask_invalid, normalize, predict_probs
from geoseg.raster.windows import BlendPlan, HeadWindows

if TYPE_CHECKING:
    from geoseg.models.infer import Predictor

WindowKey = tuple[str, str, int, int]  # scene key, head, row, col


class WindowCache:
    """Least recently used window outputs, up to ``max_bytes``. Thread-safe: a GPU model actor runs
    two calls at once (one batch is copied while the other runs), and both use its cache."""

    def __init__(self, max_bytes: int) -> None:
        self.lock = threading.Lock()
        self.max_bytes = max_bytes
        self.bytes = 0
        self.items: collections.OrderedDict[WindowKey, torch.Tensor] = collections.OrderedDict()
        self.sides: dict[WindowKey, int] = {}  # each window's side on the input grid
        self.hits = self.misses = 0

    def get(self, key: WindowKey) -> torch.Tensor | None:
        with self.lock:
            value = self.items.get(key)
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
            self.items.move_to_end(key)
            return value

    def drop_above(self, scene_key: str, row: int) -> None:
        """Forget the scene's windows that end above ``row``: tiles come to an actor row by row, so
        no later tile needs them (a tile sent again would compute them again)."""
        with self.lock:
            for key in [k for k in self.items if k[0] == scene_key and k[2] + self.sides.get(k, 0) <= row]:
                value = self.items.pop(key)
                self.sides.pop(key, None)
                self.bytes -= value.numel() * value.element_size()

    def put(self, key: WindowKey, value: torch.Tensor, side: int) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self.lock:
            if key in self.items:  # (the other call computed it too)
                return
            self.items[key] = value
            self.sides[key] = side
            self.bytes += size
            while self.bytes > self.max_bytes:
                old_key, old = self.items.popitem(last=False)
                self.sides.pop(old_key, None)
                self.bytes -= old.numel() * old.element_size()


def _padded(arr: np.ndarray, have: Any, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    """``arr`` (``... x h x w``, covering the window ``have``) cut or reflected out to rows
    ``[top, bottom)`` and columns ``[left, right)`` of the raster grid (beyond the raster there is no
    context). Cut where ``have`` reaches further: a tile is read with the context of its widest head
    (a land-use head reading 8x coarser pixels needs 8x the context of a buildings head)."""
    r0, c0 = int(have.row_off), int(have.col_off)
    h, w = arr.shape[-2:]
    rows = slice(max(top - r0, 0), max(min(bottom - r0, h), 0))
    cols = slice(max(left - c0, 0), max(min(right - c0, w), 0))
    arr = arr[..., rows, cols]
    r0, c0 = r0 + rows.start, c0 + cols.start
    h, w = arr.shape[-2:]
    pads = [(0, 0)] * (arr.ndim - 2) + [(r0 - top, bottom - r0 - h), (c0 - left, right - c0 - w)]
    mode: Literal["reflect", "edge"] = "reflect" if min(h, w) > 1 else "edge"
    return np.pad(arr, pads, mode=mode) if any(p for pair in pads for p in pair) else arr


def _to_model_grid(
    x: torch.Tensor, valid: torch.Tensor | None, hw: HeadWindows
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Windows of ``side`` input pixels -> ``model_side`` model pixels: the mean of the valid input
    pixels under each model pixel (``area``) when the model's pixels are larger, bilinear when they
    are smaller. A model pixel is valid when at least half of what it covers is."""
    size = (hw.model_side, hw.model_side)
    mode = "area" if hw.side > hw.model_side else "bilinear"
    kwargs: dict[str, Any] = {} if mode == "area" else {"align_corners": False}
    if valid is None:
        return F.interpolate(x, size=size, mode=mode, **kwargs), None
    v = valid[:, None].to(x.dtype)
    frac = F.interpolate(v, size=size, mode=mode, **kwargs)
    x = F.interpolate(x * v, size=size, mode=mode, **kwargs) / frac.clamp_min(1e-6)
    return x, frac[:, 0] >= 0.5


def _window_probs(
    spec: ModelConfig,
    model: torch.nn.Module,
    x: torch.Tensor,
    valid: torch.Tensor | None,
    hw: HeadWindows,
    tta: str,
    autocast: contextlib.AbstractContextManager[Any],
) -> torch.Tensor:
    """uint8 probabilities (p * 255) ``B x K x model_side x model_side`` of raw windows ``x``, the
    network run inside ``autocast`` (the actor's precision; none for scoring)."""
    x = x.float()
    if hw.resampled:
        x, valid = _to_model_grid(x, valid, hw)
    x = mask_invalid(normalize(x, spec), valid).contiguous(memory_format=torch.channels_last)
    with autocast:
        probs = predict_probs(model, x, spec, tta)
    return probs.mul_(255).round_().to(torch.uint8)  # (in place: probs is this call's own buffer)


def blend_scenes(
    predictor: Predictor, parts: list[tuple[list[dict[str, Any]], BlendPlan]]
) -> list[list[dict[str, np.ndarray]]]:
    """Every head's blended output for each tile of each scene (``parts``: a scene's payloads and
    plan): uint8 class per core pixel (semantic), or uint8 probabilities (p * 255) per channel over
    the read window (instance), as ``Predictor`` returns. Windows of the same shape go through the
    networks together, whichever scene they belong to, so many small scenes share model calls. A
    window's output does not depend on the others in its call (``_call_size``): a scene's results
    are the same alone or in company."""
    results: list[list[dict[str, np.ndarray]]] = [[{} for _ in payloads] for payloads, _ in parts]
    for payloads, plan in parts:
        predictor.cache.drop_above(plan.key, min(int(p["tile"].read.row_off) for p in payloads))
    for name, (spec, model, positions) in predictor.heads.items():
        needs = [[plan.windows(name, p["tile"].read) for p in payloads] for payloads, plan in parts]
        windows = _head_windows(predictor, parts, name, needs, spec, model, positions)
        for j, (payloads, plan) in enumerate(parts):
            hw = plan.heads[name]
            ramp = torch.from_numpy(hw.ramp()).to(predictor.device)
            weight = ramp[:, None] * ramp[None, :]  # one window's weights, side x side
            for k, (p, wins) in enumerate(zip(payloads, needs[j])):
                results[j][k][name] = _blend_tile(p["tile"], wins, windows, hw, weight, spec, plan.key, name)
    return results


@torch.inference_mode()
def blend_image(
    model: torch.nn.Module,
    spec: ModelConfig,
    image: np.ndarray,
    valid: np.ndarray | None,
    hw: HeadWindows,
    tta: str = "none",
) -> np.ndarray:
    """Blended probabilities (float32 ``K x H x W``) of a whole in-memory image, as ``geoseg run``
    computes them for a raster of that size: the same window grid, reflection beyond the edges,
    window outputs rounded to uint8 and squared-sine weights. For scoring a model on held-out
    scenes the way users get it (``geoseg train``); a window with no valid pixel is skipped (it
    covers none the scores count)."""
    from rasterio.windows import Window

    h, w = image.shape[-2:]
    rows, cols = hw.starts(h), hw.starts(w)
    top, left = rows[0], cols[0]
    bottom, right = rows[-1] + hw.side, cols[-1] + hw.side
    have = Window(0, 0, w, h)
    image = _padded(image.astype(WIDEN.get(image.dtype, image.dtype), copy=False), have, top, left, bottom, right)
    valid = _padded(np.ones((h, w), bool) if valid is None else valid, have, top, left, bottom, right)
    ramp = torch.from_numpy(hw.ramp())
    weight = ramp[:, None] * ramp[None, :]
    total = torch.zeros((spec.out_channels, h, w), dtype=torch.float32)
    weight_sum = torch.zeros((h, w), dtype=torch.float32)
    for r in rows:
        for c in cols:
            v = valid[r - top : r - top + hw.side, c - left : c - left + hw.side]
            if not v.any():
                continue
            x = torch.from_numpy(
                np.ascontiguousarray(image[:, r - top : r - top + hw.side, c - left : c - left + hw.side])
            )
            vt = None if v.all() else torch.from_numpy(np.ascontiguousarray(v))[None]
            probs = _window_probs(spec, model, x[None], vt, hw, tta, contextlib.nullcontext())[0].float() / 255.0
            if hw.resampled:
                probs = F.interpolate(probs[None], size=(hw.side, hw.side), mode="bilinear", align_corners=False)[0]
            y0, y1, x0, x1 = max(r, 0), min(r + hw.side, h), max(c, 0), min(c + hw.side, w)
            part = weight[y0 - r : y1 - r, x0 - c : x1 - c]
            total[:, y0:y1, x0:x1] += probs[:, y0 - r : y1 - r, x0 - c : x1 - c] * part
            weight_sum[y0:y1, x0:x1] += part
    return (total / weight_sum.clamp_min(1e-12)).numpy()


def _with_scale_offset(spec: ModelConfig, scale_offset: tuple[float, float] | None) -> ModelConfig:
    """The head with the input's own (scale, offset) to physical values, where its normalisation
    works in physical values (mean/std); unchanged otherwise."""
    if scale_offset is None or not isinstance(spec.normalize, MeanStdNormalize):
        return spec
    scale, offset = scale_offset
    return spec.model_copy(update={"normalize": spec.normalize.model_copy(update={"scale": scale, "offset": offset})})


def _head_windows(
    predictor: Predictor,
    parts: list[tuple[list[dict[str, Any]], BlendPlan]],
    name: str,
    needs: list[list[list[tuple[int, int]]]],
    spec: ModelConfig,
    model: torch.nn.Module,
    positions: list[int],
) -> dict[WindowKey, torch.Tensor]:
    """The outputs of every window the tiles of ``parts`` need: from the cache, or computed once.
    Windows go through the network in calls of one shape and one normalisation, all valid or
    not (the arithmetic of a window then depends on nothing else in its call)."""
    found: dict[WindowKey, torch.Tensor] = {}
    todo: dict[WindowKey, tuple[int, int]] = {}  # window -> (part, payload whose context holds its pixels)
    for j, (_, plan) in enumerate(parts):
        for i, wins in enumerate(needs[j]):
            for r, c in wins:
                key = (plan.key, name, r, c)
                if key in found or key in todo:
                    continue
                hit = predictor.cache.get(key)
                if hit is not None:
                    found[key] = hit
                else:
                    todo[key] = (j, i)
    padded: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, int, int]] = {}
    # Per call group, each window as (key, its tile's context, row, col): cut when its call runs,
    # so a batch holds one call's windows at a time beside the contexts.
    calls: dict[tuple[Any, ...], list[tuple[WindowKey, tuple[int, int], int, int]]] = {}
    for key, (j, i) in todo.items():
        payloads, plan = parts[j]
        hw = plan.heads[name]
        if (j, i) not in padded:
            padded[(j, i)] = _tile_context(payloads[i], needs[j][i], hw)
        image, valid, top, left = padded[(j, i)]
        r, c = key[2] - top, key[3] - left
        window_valid = valid[r : r + hw.side, c : c + hw.side]
        # (a scene's own scale and offset to physical values change its normalisation)
        group = (hw, plan.scale_offsets.get(name), bool(window_valid.all()), str(image.dtype))
        calls.setdefault(group, []).append((key, (j, i), r, c))
    for (hw, scale_offset, all_valid, _), entries in calls.items():
        call_spec = _with_scale_offset(spec, scale_offset)
        size = _call_size(predictor, hw, len(entries))
        tta = spec.tta or predictor.config.runtime.tta
        for start in range(0, len(entries), size):
            part = entries[start : start + size]
            images = [padded[where][0][positions, r : r + hw.side, c : c + hw.side] for _, where, r, c in part]
            valids = [padded[where][1][r : r + hw.side, c : c + hw.side] for _, where, r, c in part]
            if predictor.device.type == "cpu" and len(part) < size:  # a call of the usual shape
                images += [np.zeros_like(images[0])] * (size - len(part))
                valids += [np.ones_like(valids[0])] * (size - len(part))
            x = torch.from_numpy(np.stack(images)).to(predictor.device)
            v = None if all_valid else torch.from_numpy(np.stack(valids)).to(predictor.device)
            out = _window_probs(call_spec, model, x, v, hw, tta, predictor.autocast(spec))
            for (key, *_), probs in zip(part, out):
                found[key] = probs
                predictor.cache.put(key, probs, hw.side)
    return found


# Input pixels of one CPU model call of small windows: this many windows of one shape go through
# the network together, 8 of 64^2, 3 of 96^2, 2 of 128^2 (16 windows of 64^2 ran a U-Net in 32 ms
# here, one at a time in 55 ms). Windows of 160^2 and more (model windows are multiples of 32) run
# one per call, as a call's activations grow with its windows.
CPU_CALL_PIXELS = 8 * 64 * 64


def _call_size(predictor: Predictor, hw: HeadWindows, pending: int) -> int:
    """Windows per model call. On the CPU a fixed number per window shape, padded with blank
    windows when fewer are waiting: oneDNN picks its kernels by the call's shape, so a window's
    output is then the same bits alone or beside other scenes' windows. On a GPU, all that are
    waiting up to ``runtime.batch_size``."""
    if predictor.device.type == "cpu":
        return max(1, CPU_CALL_PIXELS // (hw.model_side * hw.model_side))
    return max(1, min(pending, predictor.config.runtime.batch_size))


def _tile_context(
    payload: dict[str, Any], wins: list[tuple[int, int]], hw: HeadWindows
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The tile's image and validity reflected out to cover all its windows, widened to a dtype
    torch computes on; with the raster row and column of their first pixel."""

    top, left = min(r for r, _ in wins), min(c for _, c in wins)
    bottom, right = max(r for r, _ in wins) + hw.side, max(c for _, c in wins) + hw.side
    have = payload["tile"].source
    image = payload["image"]
    image = image.astype(WIDEN.get(image.dtype, image.dtype), copy=False)
    valid = payload.get("valid")
    valid = np.ones(image.shape[-2:], bool) if valid is None else valid
    return (_padded(image, have, top, left, bottom, right), _padded(valid, have, top, left, bottom, right), top, left)


def _blend_tile(
    tile: Any,
    wins: list[tuple[int, int]],
    windows: dict[WindowKey, torch.Tensor],
    hw: HeadWindows,
    window_weight: torch.Tensor,
    spec: ModelConfig,
    scene_key: str,
    name: str,
) -> np.ndarray:
    """The weighted mean of the tile's windows over its read window, cropped as the head returns it."""
    read = tile.read
    r0, c0, h, w = int(read.row_off), int(read.col_off), int(read.height), int(read.width)
    total: torch.Tensor | None = None
    weight_sum = torch.zeros((h, w), dtype=torch.float32, device=window_weight.device)
    # Arithmetic in place where a buffer is this function's own: the model actor's memory peaks here.
    for r, c in wins:
        probs = windows[(scene_key, name, r, c)].to(torch.float32).div_(255.0)  # (uint8: a new tensor)
        if hw.resampled:
            probs = F.interpolate(probs[None], size=(hw.side, hw.side), mode="bilinear", align_corners=False)[0]
        # The part of the window inside the read window, in both frames.
        y0, y1 = max(r, r0), min(r + hw.side, r0 + h)
        x0, x1 = max(c, c0), min(c + hw.side, c0 + w)
        weight = window_weight[y0 - r : y1 - r, x0 - c : x1 - c]
        part = probs[:, y0 - r : y1 - r, x0 - c : x1 - c].mul_(weight)
        if total is None:
            total = torch.zeros((probs.shape[0], h, w), dtype=torch.float32, device=weight.device)
        total[:, y0 - r0 : y1 - r0, x0 - c0 : x1 - c0] += part
        weight_sum[y0 - r0 : y1 - r0, x0 - c0 : x1 - c0] += weight
        del probs, part
    assert total is not None
    if spec.task == "semantic":
        rs, cs = tile.core_in_read
        return total[:, rs, cs].div_(weight_sum[rs, cs]).argmax(dim=0).to(torch.uint8).cpu().numpy()
    return total.div_(weight_sum).mul_(255).round_().to(torch.uint8).cpu().numpy()
