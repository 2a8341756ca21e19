"""The four cloud and cloud-shadow networks of ukis-csmask (DLR, Apache-2.0) as geoseg models.

ukis-csmask ships each network as an ONNX file inside its wheel. They are segmentation-models-pytorch
U-Nets with an EfficientNet-B4 encoder whose ONNX initializer names are smp state-dict keys with a
``model.`` prefix, so the weights load straight into ``smp.Unet`` (only the encoder's classification
head, unused by the U-Net, is absent). The weights are read from the installed package at run time,
never copied into this repository. Used by ``configs/sentinel2-clouds.yaml`` and
``configs/landsat-clouds.yaml`` (``factory: geoseg.models.csmask:<variant>``); see docs/models.md.

Wieland, M., Li, Y., Martinis, S. (2019): Multi-sensor cloud and cloud shadow segmentation with a
convolutional neural network. Remote Sensing of Environment 230, 111203.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from geoseg.core.errors import ModelError
from geoseg.models.load import installed_package_file

CLASSES = ["clear", "cloud", "cloud_shadow"]
# The encoder's classification head: in the smp module, not in the exported U-Net graph.
_UNUSED = ("encoder._conv_head.", "encoder._bn1.")


def package_file(name: str) -> Path:
    """A file of the installed ukis-csmask package; a one-line error when it is not installed."""
    return installed_package_file(
        "clouds",
        "ukis_csmask",
        name,
        not_installed="the cloud networks come from the ukis-csmask package, which is not installed: "
        "pip install 'geoseg[clouds]'",
        shipped="version 1.0 ships model_[46]b_(l1c|l2a).onnx",
    )


def model_info(variant: str) -> dict[str, Any]:
    """The JSON ukis-csmask ships beside a network: band names, mean and std of reflectance, window."""
    data: dict[str, Any] = json.loads(package_file(f"model_{variant}.json").read_text())
    return data


def build(variant: str) -> torch.nn.Module:
    """``smp.Unet('efficientnet-b4')`` filled from ukis-csmask's ``model_<variant>.onnx``."""
    import onnx
    import segmentation_models_pytorch as smp
    from onnx import numpy_helper

    info = model_info(variant)["data"]
    graph = onnx.load(str(package_file(f"model_{variant}.onnx"))).graph
    state = {
        i.name.removeprefix("model."): torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer
    }
    net = smp.Unet("efficientnet-b4", encoder_weights=None, in_channels=info["in_channels"], classes=info["classes"])
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(_UNUSED) and not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ModelError(
            "clouds",
            f"ukis-csmask model_{variant}.onnx does not match smp's Unet(efficientnet-b4): "
            f"{len(missing)} missing, {len(result.unexpected_keys)} unexpected weight(s)",
        )
    return net.eval()


def sentinel2_l2a() -> torch.nn.Module:
    """Sentinel-2 Level-2A, 4 bands: blue, green, red, nir (B02 B03 B04 B08)."""
    return build("4b_l2a")


def sentinel2_l2a_rgb() -> torch.nn.Module:
    """The Sentinel-2 Level-2A network taking red, green, blue (in that order): its first layer
    keeps those three bands' weights. A start for training RGB models (``model.init``)."""
    import segmentation_models_pytorch as smp

    four = build("4b_l2a")
    state = four.state_dict()
    stem = "encoder._conv_stem.weight"
    state[stem] = state[stem][:, [2, 1, 0]].clone()  # its inputs are blue, green, red, nir
    net = smp.Unet("efficientnet-b4", encoder_weights=None, in_channels=3, classes=len(CLASSES))
    net.load_state_dict(state, strict=False)
    return net.eval()


def sentinel2_l1c() -> torch.nn.Module:
    """Sentinel-2 Level-1C (top of atmosphere), 4 bands: blue, green, red, nir."""
    return build("4b_l1c")


def landsat_l2a() -> torch.nn.Module:
    """Landsat 5-9 (or Sentinel-2) surface reflectance, 6 bands: blue, green, red, nir, swir16, swir22."""
    return build("6b_l2a")


def landsat_l1c() -> torch.nn.Module:
    """Landsat 5-9 (or Sentinel-2) top of atmosphere, 6 bands: blue, green, red, nir, swir16, swir22."""
    return build("6b_l1c")
