"""Model factories for the benchmarks (loaded by geoseg as ``bench/models.py:<name>``).

Nothing here downloads weights: ``encoder_weights=None``.

The ``*_blocks`` heads are 1x1 convolutions with fixed weights, for the synthetic rasters of
``bench/rasters.py`` (normalised by 1/255): their pixel values come in blocks of 97 x 131 px with
11 levels, so the heads give class regions and objects of block size without any real network:

- ``landuse_blocks``: 5 classes by the level of band 1 (argmax of ``2 c_k x - c_k^2`` picks the
  centre ``c_k`` nearest to ``x``): one region per run of same-class blocks;
- ``buildings_blocks``: body where band 1 > 170/255 (levels 7 and 8, never adjacent, so every
  such block is one building), border and contact low everywhere;
- ``ships_blocks``: body where band 2 > 200/255 (level 6: one ship per block).
"""

from __future__ import annotations

import torch

NUM_CLASSES = 5


class Conv1x1(torch.nn.Module):
    """A fixed 1x1 convolution: ``out[k] = sum_c weight[k][c] * x[c] + bias[k]``."""

    def __init__(self, weight: list[list[float]], bias: list[float]) -> None:
        super().__init__()
        w = torch.tensor(weight, dtype=torch.float32)
        self.conv = torch.nn.Conv2d(w.shape[1], w.shape[0], 1)
        with torch.no_grad():
            self.conv.weight.copy_(w[:, :, None, None])
            self.conv.bias.copy_(torch.tensor(bias, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConstantLogits(Conv1x1):
    """A 1x1 convolution with zero weights and bias: zero logits for every class and pixel.

    The cheapest network that still has the pipeline's shape contract (B x K x H x W out), so a
    run with it measures the pipeline's own ceiling: reading, padding, argmax, post-processing,
    stitching and writing.
    """

    def __init__(self, in_channels: int = 3, classes: int = NUM_CLASSES) -> None:
        super().__init__([[0.0] * in_channels for _ in range(classes)], [0.0] * classes)


def trivial_semantic() -> torch.nn.Module:
    """Constant (zero) logits over 5 classes from 3 bands."""
    return ConstantLogits(3, NUM_CLASSES)


def landuse_blocks() -> torch.nn.Module:
    """5 classes from 3 bands: the class whose centre is nearest to band 1's value."""
    gain, centres = 20.0, [0.15, 0.3, 0.45, 0.6, 0.75]
    return Conv1x1([[gain * 2 * c, 0.0, 0.0] for c in centres], [-gain * c * c for c in centres])


def buildings_blocks() -> torch.nn.Module:
    """Instance logits [body, border, contact] from 3 bands: body where band 1 > 170/255."""
    gain = 50.0
    return Conv1x1([[gain, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [-gain * 170 / 255, -4.0, -6.0])


def ships_blocks() -> torch.nn.Module:
    """Instance logit [body] from 3 bands: body where band 2 > 200/255."""
    gain = 50.0
    return Conv1x1([[0.0, gain, 0.0]], [-gain * 200 / 255])


def unet_resnet18() -> torch.nn.Module:
    """A real segmentation network: smp U-Net, ResNet-18 encoder, random weights, 3 bands -> 5 classes."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    return smp.Unet("resnet18", encoder_weights=None, in_channels=3, classes=NUM_CLASSES)
