"""Scores: land-use pixel IoU per class, and instance precision / recall / F1 at IoU 0.5.

Two entry points:
- ``score_arrays`` / ``match_instances``: numpy in, numpy out (used by ``geoseg train`` on its
  held-out split);
- ``score_synthetic(run_dir, truth_dir)``: a ``geoseg run`` output folder of a synthetic scene
  against the scene's truth (``OUT.truth/landuse.tif`` and ``objects.gpkg``), e.g. for the demo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

IGNORE = 255


def confusion(pred: np.ndarray, truth: np.ndarray, num_classes: int, valid: np.ndarray | None = None) -> np.ndarray:
    """``K x (K + 1)`` counts (rows truth, columns prediction) over labelled pixels, ``K = num_classes``.

    Truth values outside ``0..K-1`` (255 = nodata) are ignored; a prediction outside it (255 = no
    result) goes to the last column: a miss for that pixel's class.
    """
    t = truth.astype(np.int64).ravel()
    p = pred.astype(np.int64).ravel()
    keep = (t >= 0) & (t < num_classes)
    if valid is not None:
        keep &= valid.ravel()
    t, p = t[keep], p[keep]
    p = np.where((p >= 0) & (p < num_classes), p, num_classes)
    cm = np.bincount(t * (num_classes + 1) + p, minlength=num_classes * (num_classes + 1))
    return cm.reshape(num_classes, num_classes + 1)


def semantic_scores(cm: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """IoU per class (None where a class is absent from truth and prediction), mean IoU, accuracy,
    from a ``confusion`` matrix."""
    k = len(classes)
    tp = np.diag(cm[:, :k]).astype(np.float64)
    truth_n = cm.sum(1)
    union = truth_n + cm[:, :k].sum(0) - tp
    iou = {c: (round(float(tp[k] / union[k]), 4) if union[k] > 0 else None) for k, c in enumerate(classes)}
    present = [v for v in iou.values() if v is not None]
    return {
        "iou": iou,
        "mean_iou": round(float(np.mean(present)), 4) if present else None,
        "pixel_accuracy": round(float(tp.sum() / max(truth_n.sum(), 1)), 4),
        "pixels": int(truth_n.sum()),
    }


def match_instances(pred: np.ndarray, truth: np.ndarray, iou_threshold: float = 0.5) -> dict[str, Any]:
    """Instance P/R/F1 from two label rasters (0 = background): a match is a pair with IoU >= 0.5.

    With IoU > 0.5 a pair is unique on both sides, so greedy matching by IoU is exact.
    """
    p, t = pred.astype(np.int64).ravel(), truth.astype(np.int64).ravel()
    pu, p_inv = np.unique(p, return_inverse=True)
    tu, t_inv = np.unique(t, return_inverse=True)
    p_area = np.bincount(p_inv)
    t_area = np.bincount(t_inv)
    both = (p > 0) & (t > 0)
    pairs, inter = np.unique(np.stack([p_inv[both], t_inv[both]]), axis=1, return_counts=True)
    union = p_area[pairs[0]] + t_area[pairs[1]] - inter
    iou = inter / np.maximum(union, 1)
    order = np.argsort(-iou)
    used_p: set[int] = set()
    used_t: set[int] = set()
    for k in order:
        if iou[k] < iou_threshold:
            break
        a, b = int(pairs[0, k]), int(pairs[1, k])
        if a not in used_p and b not in used_t:
            used_p.add(a)
            used_t.add(b)
    return prf(len(used_p), int((pu > 0).sum()), int((tu > 0).sum()), iou_threshold)


def prf(tp: int, n_pred: int, n_truth: int, iou_threshold: float = 0.5) -> dict[str, Any]:
    """Precision, recall and F1 from match counts."""
    precision = tp / n_pred if n_pred else (1.0 if n_truth == 0 else 0.0)
    recall = tp / n_truth if n_truth else (1.0 if n_pred == 0 else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "iou_threshold": iou_threshold,
        "predicted": n_pred,
        "truth": n_truth,
        "matched": tp,
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
    }


def match_polygons(pred: list[Any], truth: list[Any], iou_threshold: float = 0.5) -> dict[str, Any]:
    """Instance P/R/F1 between two lists of shapely polygons (same CRS)."""
    import shapely

    tree = shapely.STRtree(truth)
    candidates: list[tuple[float, int, int]] = []
    for i, g in enumerate(pred):
        for j in tree.query(g, predicate="intersects"):
            inter = g.intersection(truth[j]).area
            union = g.area + truth[j].area - inter
            if union > 0 and inter / union >= iou_threshold:
                candidates.append((inter / union, i, int(j)))
    used_p: set[int] = set()
    used_t: set[int] = set()
    for _, i, j in sorted(candidates, reverse=True):
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
    return prf(len(used_p), len(pred), len(truth), iou_threshold)


def on_imagery(geoms: Any, valid: np.ndarray, transform: Any) -> list[Any]:
    """The geometries whose centroid falls on a valid pixel of ``valid`` (a raster's dataset mask,
    with its ``transform``): objects are counted only where there is imagery."""
    inv = ~transform
    keep = []
    for geom in geoms:
        if geom is None or geom.is_empty:
            continue
        col, row = (int(v) for v in inv * (geom.centroid.x, geom.centroid.y))
        if 0 <= row < valid.shape[0] and 0 <= col < valid.shape[1] and valid[row, col]:
            keep.append(geom)
    return keep


def distinct_outlines(geoms: Any, same_iou: float = 0.99) -> list[Any]:
    """``geoms`` without the ones that repeat an earlier one (IoU >= ``same_iou``). OpenStreetMap
    extracts can hold a building twice (HOT's Nairobi outlines: 104 of 287); a copy counted as a
    second true object would halve recall. ``geoseg train`` folds them the same way when it burns
    outlines (an outline whose pixels are all taken is no object)."""
    import shapely

    kept: list[Any] = []
    tree_geoms = [g for g in geoms if g is not None and not g.is_empty]
    tree = shapely.STRtree(tree_geoms)
    for i, geom in enumerate(tree_geoms):
        repeats = any(
            j < i and geom.intersection(tree_geoms[j]).area >= same_iou * geom.union(tree_geoms[j]).area
            for j in tree.query(geom)
        )
        if not repeats:
            kept.append(geom)
    return kept


def _read_layer(path: Path, layer: str) -> list[Any]:
    import pyogrio
    import shapely

    if not path.exists() or layer not in [name for name, _ in pyogrio.list_layers(path)]:
        return []
    _, _, geometry, _ = pyogrio.raw.read(path, layer=layer)
    return [g for g in shapely.from_wkb(geometry) if g is not None and not g.is_empty]


def score_synthetic(
    run_dir: str | Path, truth_dir: str | Path, landuse: str = "landuse", objects: dict[str, str] | None = None
) -> dict[str, Any]:
    """Score one scene's ``geoseg run`` outputs (``out/<stem>/``) against a synthetic truth folder.

    ``landuse`` names the semantic head; ``objects`` maps instance heads to truth layers
    (default ``{"buildings": "buildings", "ships": "ships"}``). Heads missing from the run are skipped.
    """
    import rasterio

    run_dir, truth_dir = Path(run_dir), Path(truth_dir)
    stem = run_dir.name
    objects = objects if objects is not None else {"buildings": "buildings", "ships": "ships"}
    result: dict[str, Any] = {}
    mask = run_dir / f"{stem}_{landuse}.tif"
    if mask.exists():
        with rasterio.open(truth_dir / "landuse.tif") as t, rasterio.open(mask) as p:
            classes = (t.tags().get("classes") or "").split(",")
            cm = np.zeros((len(classes), len(classes) + 1), dtype=np.int64)
            for _, window in t.block_windows(1):
                cm += confusion(p.read(1, window=window), t.read(1, window=window), len(classes))
        result[landuse] = semantic_scores(cm, classes)
    gpkg = run_dir / f"{stem}.gpkg"
    for head, layer in objects.items():
        pred = _read_layer(gpkg, head)
        if pred or head in _layers(gpkg):
            result[head] = match_polygons(pred, _read_layer(truth_dir / "objects.gpkg", layer))
    return result


def _layers(path: Path) -> list[str]:
    import pyogrio

    return [name for name, _ in pyogrio.list_layers(path)] if path.exists() else []


def format_scores(scores: dict[str, Any]) -> str:
    """A few human lines: IoU per class for semantic heads, P/R/F1 for instance heads."""
    lines = []
    for head, s in scores.items():
        if "iou" in s:
            per = ", ".join(f"{c} {v:.3f}" if v is not None else f"{c} -" for c, v in s["iou"].items())
            lines.append(f"{head}: mean IoU {s['mean_iou']}, pixel accuracy {s['pixel_accuracy']} ({per})")
        elif "f1" in s:
            lines.append(
                f"{head}: {s['predicted']} predicted / {s['truth']} true, precision {s['precision']:.3f}, "
                f"recall {s['recall']:.3f}, F1 {s['f1']:.3f} at IoU {s['iou_threshold']}"
            )
    return "\n".join(lines)


# The name ``geoseg.demo`` calls.
evaluate_scene = score_synthetic
