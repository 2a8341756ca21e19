"""Labels from model outputs: connected class regions, and instance decoding.

All functions are numpy in, numpy out. Labels are ``int32``: 0 is background/invalid, 1..n objects.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import measure
from skimage.segmentation import watershed

from geoseg.core.heads import ModelConfig

CONNECTIVITY_4 = ndimage.generate_binary_structure(2, 1)
CONNECTIVITY_8 = ndimage.generate_binary_structure(2, 2)


def label_regions(classes: np.ndarray, valid: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Connected regions of equal class (4-connected, as GDAL polygonises them).

    Returns ``(labels, label_class)`` where ``label_class[label]`` is the class index of a region
    (``label_class[0]`` is unused). One labelling pass over the class raster (skimage labels runs
    of equal value), not one per class: half the time here.
    """
    marked = np.where(valid, classes, num_classes).astype(np.int32, copy=False)  # invalid: a background value
    labels = measure.label(marked, background=num_classes, connectivity=1).astype(np.int32, copy=False)
    label_class = np.zeros(int(labels.max()) + 1, dtype=np.int32)
    label_class[labels.ravel()] = marked.ravel()  # every pixel of a region has its class
    label_class[0] = 0
    return labels, label_class


def decode_instances(probs: np.ndarray, valid: np.ndarray, spec: ModelConfig) -> np.ndarray:
    """Objects from per-channel probabilities (``uint8``, p * 255) over a tile's read window.

    One channel: 8-connected components of ``body > threshold``. Three channels: a marker
    watershed on ``-body`` from seeds ``body * (1 - contact) > seed_threshold``, grown over
    ``body > mask_threshold``; foreground that no seed reaches is dropped (SpaceNet practice).
    """
    body = probs[0].astype(np.float32) / 255.0
    if spec.channels == ["body"]:
        labels, _ = ndimage.label((body > spec.threshold) & valid, structure=CONNECTIVITY_8)
        return labels.astype(np.int32, copy=False)
    contact = probs[spec.channels.index("contact")].astype(np.float32) / 255.0
    seeds, _ = ndimage.label((body * (1.0 - contact) > spec.seed_threshold) & valid, structure=CONNECTIVITY_8)
    mask = (body > spec.mask_threshold) & valid
    labels = watershed(-body, markers=seeds, mask=mask, connectivity=2)
    return labels.astype(np.int32, copy=False)
