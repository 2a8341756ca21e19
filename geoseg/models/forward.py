"""A batch through a network: raw values normalised by the head's fixed statistics, nodata zeroed,
the forward pass (with flips for test-time augmentation) and its probabilities. Shared by the run's
inference, the blending of windows and training, so all three feed a network alike."""

from __future__ import annotations

import numpy as np
import torch

from geoseg.core.heads import ClipNormalize, DbNormalize, MeanStdNormalize, ModelConfig, ScaleNormalize

# Integer dtypes torch cannot hold, widened on the way in.
WIDEN = {np.dtype("uint16"): np.int32, np.dtype("uint32"): np.int64, np.dtype("int8"): np.int16}


def _per_band(values: list[float], x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)


def normalize(x: torch.Tensor, spec: ModelConfig) -> torch.Tensor:
    """Float ``B x C x H x W`` raw values -> network input. Fixed statistics only: every tile of
    every raster is mapped the same way (never by the tile's own statistics)."""
    norm = spec.normalize
    if isinstance(norm, ScaleNormalize):
        return x / norm.scale
    if isinstance(norm, MeanStdNormalize):
        if norm.scale != 1.0 or norm.offset != 0.0:
            x = x * norm.scale + norm.offset
        return (x - _per_band(norm.mean, x)) / _per_band(norm.std, x)
    if isinstance(norm, ClipNormalize):
        low, high = _per_band(norm.clip_low, x), _per_band(norm.clip_high, x)
        return (torch.minimum(torch.maximum(x, low), high) - low) / (high - low)
    if isinstance(norm, DbNormalize):
        db = 10.0 * torch.log10(torch.clamp(x, min=norm.floor))
        return (db - _per_band(norm.mean, x)) / _per_band(norm.std, x)
    return x


def mask_invalid(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Nodata pixels (GDAL mask) enter the network as 0 after normalisation (the training mean
    for mean/std), in training and at run time alike, so that raw fill values such as -99999
    never reach it."""
    return x if valid is None else torch.where(valid[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def _flips(tta: str) -> list[tuple[int, ...]]:
    """Dimensions to flip for each pass: identity, then horizontal, vertical and both for 'flip'."""
    return [()] if tta == "none" else [(), (3,), (2,), (2, 3)]


def predict_probs(model: torch.nn.Module, x: torch.Tensor, spec: ModelConfig, tta: str = "none") -> torch.Tensor:
    """Probabilities ``B x K x H x W`` (softmax for semantic, sigmoid per channel for instance),
    averaged over the flips of ``tta``. ``x`` is already normalised."""
    total: torch.Tensor | None = None
    flips = _flips(tta)
    for dims in flips:
        xi = torch.flip(x, dims) if dims else x
        logits = model(xi).float()
        probs = torch.softmax(logits, dim=1) if spec.task == "semantic" else torch.sigmoid(logits)
        probs = torch.flip(probs, dims) if dims else probs
        total = probs if total is None else total + probs
    assert total is not None
    # (in place, and not at all for one pass: a batch's probabilities are the actor's largest buffers)
    return total if len(flips) == 1 else total.div_(len(flips))
