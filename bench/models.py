"""Model factories for the benchmarks (loaded by geoseg as ``bench/models.py:<name>``).

Nothing here downloads weights: ``encoder_weights=None``.
"""

from __future__ import annotations

import torch

NUM_CLASSES = 5


class ConstantLogits(torch.nn.Module):
    """A 1x1 convolution with zero weights and bias: zero logits for every class and pixel.

    The cheapest network that still has the pipeline's shape contract (B x K x H x W out), so a
    run with it measures the pipeline's own ceiling: reading, padding, argmax, post-processing,
    stitching and writing.
    """

    def __init__(self, in_channels: int = 3, classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, classes, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def trivial_semantic() -> torch.nn.Module:
    """Constant (zero) logits over 5 classes from 3 bands."""
    return ConstantLogits(3, NUM_CLASSES)


def unet_resnet18() -> torch.nn.Module:
    """A real segmentation network: smp U-Net, ResNet-18 encoder, random weights, 3 bands -> 5 classes."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    return smp.Unet("resnet18", encoder_weights=None, in_channels=3, classes=NUM_CLASSES)
