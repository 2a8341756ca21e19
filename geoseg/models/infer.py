"""The model actor: one tile read feeds every head; small outputs leave the actor.

``Predictor`` is a plain callable class (Ray's batch-inference pattern): it runs without Ray, and
``geoseg.runner.pipeline`` wraps it in an actor, one per GPU; each actor builds its models once. The device
comes from ``torch.cuda.is_available()``, never from Ray's GPU ids. Raw pixels arrive in the
raster's own dtype and are normalised on the device. The models run channels_last under autocast
in ``runtime.precision`` (``auto``: bf16 on CUDA, fp16 where bf16 is missing, bf16 on CPUs with
native bf16, float32 elsewhere; a head may pin fp32). Each
model is checked on a zero batch when it is built, so a wrong config fails at start-up. Optional flip test-time
augmentation averages probabilities over four flips (``runtime.tta`` or a head's ``tta``).
"""

from __future__ import annotations

import contextlib
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoseg.core.config import Config
from geoseg.core.heads import ModelConfig
from geoseg.models.blend import WindowCache, blend_scenes
from geoseg.models.forward import WIDEN, mask_invalid, normalize, predict_probs
from geoseg.models.load import check_model
from geoseg.models.traced import build_for_inference
from geoseg.raster.grid import Tile, pad_to_square, padded_size, read_offset
from geoseg.raster.windows import BlendPlan

# torch has no arithmetic on these; widen on the host (still smaller than float32 for uint16).


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this machine's CPU computes bf16 natively (AVX-512 BF16 or AMX): the one place that
    reads the CPU's flags (Linux's /proc/cpuinfo; elsewhere: no)."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA (fp16 where the GPU lacks bf16) and on CPUs with native bf16, else fp32."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def pick_device(requested: str) -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _padded_valid(payloads: list[dict[str, Any]], halo: int, side: int, device: torch.device) -> torch.Tensor | None:
    masks = [p.get("valid") for p in payloads]
    if all(m is None or bool(m.all()) for m in masks):
        return None
    padded = [
        pad_to_square((m if m is not None else np.ones(p["image"].shape[-2:], bool))[None], p["tile"], halo, side)[0]
        for m, p in zip(masks, payloads)
    ]
    return torch.from_numpy(np.stack(padded)).to(device)


def _passed_on(payload: dict[str, Any]) -> dict[str, Any]:
    """What a tile's result carries whatever the models say: the tile, its status and validity."""
    return {
        "tile": payload["tile"],
        "status": payload["status"],
        "error": payload.get("error"),
        "valid": _read_valid(payload),
    }


def _read_valid(payload: dict[str, Any]) -> np.ndarray | None:
    """The payload's validity over the tile's read window (it was read over the context)."""
    valid = payload.get("valid")
    return valid if valid is None else valid[payload["tile"].read_in_source]


class Predictor:
    """Callable over a list of tile payloads; returns, per tile, what each head produced.

    Semantic head -> ``uint8`` class per core pixel. Instance head -> ``uint8`` probabilities
    (p * 255) per channel over the read window, for decoding in CPU tasks after the actor.
    """

    def __init__(self, config: Config, num_threads: int | None = None) -> None:
        self.config = config
        self.device = pick_device(config.runtime.device)
        self.precision = resolve_precision(config.runtime.precision, self.device)
        if self.device.type == "cpu" and num_threads:
            torch.set_num_threads(num_threads)
        self.halo = config.tiling.halo
        self.side = padded_size(config.tiling.tile_size, self.halo)
        positions = {b: i for i, b in enumerate(config.bands_needed)}
        self.heads: dict[str, tuple[ModelConfig, torch.nn.Module, list[int]]] = {}
        self._pinned_buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self.cache = WindowCache(config.runtime.window_cache_mb * 2**20)
        for name, spec in config.models.items():
            model = build_for_inference(name, spec, config.base_dir, self.device)
            check_model(name, spec, model)  # fails at start-up, naming the model, before any tile is read
            # channels_last on the CPU too: oneDNN convolutions ran 1.5x faster with it here.
            model = model.to(self.device).to(memory_format=torch.channels_last)
            self.heads[name] = (spec, model, [positions[b] for b in spec.bands])

    def _pinned(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` copied into a page-locked buffer kept per thread and shape (allocating pinned
        memory per batch costs more than the copy). Safe to reuse: each call ends by copying its
        results back, which waits for the transfer."""
        key = (threading.get_ident(), x.dtype, tuple(x.shape))
        buf = self._pinned_buffers.get(key)
        if buf is None:
            buf = self._pinned_buffers[key] = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        return buf.copy_(x)

    def autocast(self, spec: ModelConfig) -> contextlib.AbstractContextManager[Any]:
        """The head's number format: the run's precision, or float32 where the head pins it."""
        if self.precision == "fp32" or spec.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def __call__(self, batch: list[dict[str, Any]], plan: BlendPlan | None = None) -> list[dict[str, Any]]:
        """Run every head over the tiles that have pixels; pass errors and empty tiles through.
        With a scene's ``plan`` the heads run on its blended windows (``geoseg.models.blend``), else each
        tile runs as one window of its read window."""
        return self.predict_scenes([(batch, plan)])[0]

    def predict_scenes(self, parts: list[tuple[list[dict[str, Any]], BlendPlan | None]]) -> list[list[dict[str, Any]]]:
        """``__call__`` for the tiles of several scenes at once (``parts``: each scene's payloads and
        plan), their windows sharing model calls; one list of results per part, each the same as
        that scene's tiles alone would give."""
        outs = [[_passed_on(p) for p in batch] for batch, _ in parts]
        ok = [[i for i, p in enumerate(batch) if p["status"] == "ok"] for batch, _ in parts]
        blended = [(j, idx) for j, idx in enumerate(ok) if idx and parts[j][1] is not None]
        if blended:
            scenes = [([parts[j][0][i] for i in idx], plan) for j, idx in blended if (plan := parts[j][1]) is not None]
            with torch.inference_mode():
                heads_per_scene = blend_scenes(self, scenes)
            for (j, idx), heads_list in zip(blended, heads_per_scene):
                for i, heads in zip(idx, heads_list):
                    outs[j][i]["heads"] = heads
        groups: dict[tuple[str, int, int], list[tuple[int, int]]] = {}  # (dtype, bands, side) -> tiles
        for j, (batch, plan) in enumerate(parts):
            for i in ok[j] if plan is None else []:
                image, tile = batch[i]["image"], batch[i]["tile"]
                groups.setdefault((str(image.dtype), image.shape[0], self._side(tile)), []).append((j, i))
        for (_, _, side), where in groups.items():
            for (j, i), heads in zip(where, self._run([parts[j][0][i] for j, i in where], side)):
                outs[j][i]["heads"] = heads
        return outs

    def _side(self, tile: Tile) -> int:
        """The padded square a tile runs in: the full tile's, or smaller for a tile whose core is
        smaller (a small raster, a corner). A property of the tile alone, never of the batch it
        travels in, so results do not depend on batching; small scenes then cost what their
        pixels cost, not a full tile's model run."""
        core = max(int(tile.core.height), int(tile.core.width))
        return min(self.side, padded_size(core, self.halo))

    @torch.inference_mode()
    def _run(self, payloads: list[dict[str, Any]], side: int) -> list[dict[str, np.ndarray]]:
        arrays = [pad_to_square(p["image"], p["tile"], self.halo, side) for p in payloads]
        stacked = np.stack(arrays)
        stacked = stacked.astype(WIDEN.get(stacked.dtype, stacked.dtype), copy=False)
        x = torch.from_numpy(stacked)
        if self.device.type == "cuda":
            x = self._pinned(x).to(self.device, non_blocking=True)
        # Reorder to channels_last while pixels are still 1-2 bytes; float and the element-wise
        # normalisation keep the layout, so no float-sized copy is spent on it.
        x = x.contiguous(memory_format=torch.channels_last)
        valid = _padded_valid(payloads, self.halo, side, x.device)
        results: list[dict[str, np.ndarray]] = [{} for _ in payloads]
        every_band = list(range(x.shape[1]))
        for part in self._model_calls(len(payloads)):
            xf = x[part].float()
            valid_part = None if valid is None else valid[part]
            for name, (spec, model, positions) in self.heads.items():
                xi = xf if positions == every_band else xf[:, positions]
                xi = mask_invalid(normalize(xi, spec), valid_part).contiguous(memory_format=torch.channels_last)
                out = self._head_output(spec, model, xi)
                for k, p in enumerate(payloads[part], start=part.start):
                    if spec.task == "semantic":
                        h, w = int(p["tile"].core.height), int(p["tile"].core.width)
                        results[k][name] = out[k - part.start, :h, :w]
                    else:
                        results[k][name] = self._crop_read(out[k - part.start], p["tile"])
        return results

    def _model_calls(self, n: int) -> list[slice]:
        """The tiles of a batch that go through the networks together: all of them on a GPU; one
        at a time on the CPU, where oneDNN ran a U-Net no faster on 4 tiles at once (1.20 s against
        1.10 s for 4 tiles of 576^2 here) while a call's activations grow with its tiles (a U-Net's
        reach GBs at 4): the actor's memory then stays that of one tile."""
        step = n if self.device.type == "cuda" else 1
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def _head_output(self, spec: ModelConfig, model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
        """uint8 out of the device: class per core pixel (semantic), or p * 255 per channel."""
        tta = spec.tta or self.config.runtime.tta
        with self.autocast(spec):
            if spec.task == "semantic" and tta == "none":
                probs = model(x)  # argmax of logits = argmax of softmax: skip the softmax
            else:
                probs = predict_probs(model, x, spec, tta)
        if spec.task == "semantic":
            # Crop to the largest core on the device: less to copy back.
            side = self.config.tiling.tile_size
            core = probs[:, :, self.halo : self.halo + side, self.halo : self.halo + side]
            return core.argmax(dim=1).to(torch.uint8).cpu().numpy()
        return (probs * 255).round().to(torch.uint8).cpu().numpy()

    def _crop_read(self, arr: np.ndarray, tile: Tile) -> np.ndarray:
        r0, c0 = read_offset(tile, self.halo)
        return arr[:, r0 : r0 + int(tile.read.height), c0 : c0 + int(tile.read.width)]
