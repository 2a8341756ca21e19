"""Choose an instance model's decoding thresholds and minimum area on **training** places (never on
the held-out ones its card reports), scoring each setting as ``geoseg train --evaluate`` scores.

The network runs once per scene (blended windows, as ``geoseg run``); every setting of the grid then
only decodes its probabilities again. Prints one line per setting, best F1 last, and writes them
to ``--out``.

Usage::

    python -m bench.tune_postprocess configs/train/s2-ships-l2a.yaml --places algiers busan \\
        --threshold 0.4 0.5 0.6 0.7 --min-area-m2 0 200 400
    python -m bench.tune_postprocess configs/train/s2-ships-l2a.yaml --places algiers busan \\
        --tta none flip --threshold 0.5 0.6
    python -m bench.tune_postprocess configs/train/aerial-buildings.yaml --places kampala \\
        --seed-threshold 0.6 0.7 0.8 --mask-threshold 0.4 0.5 --min-area-m2 5 10 20
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def main() -> None:
    from geoseg.core.contract import resolve
    from geoseg.models.blend import blend_image
    from geoseg.models.decode import decode_instances
    from geoseg.raster.windows import head_windows
    from geoseg.train.config import load_train_config
    from geoseg.train.data import load_scene
    from geoseg.train.evaluate import match_instances, prf
    from geoseg.train.model_dir import load_trained
    from geoseg.train.score import _pixel_m

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--model", help="model directory (default: the config's out)")
    ap.add_argument("--places", nargs="+", required=True, help="training places to tune on")
    ap.add_argument("--threshold", nargs="*", type=float, default=[])
    ap.add_argument("--seed-threshold", nargs="*", type=float, default=[])
    ap.add_argument("--mask-threshold", nargs="*", type=float, default=[])
    ap.add_argument("--min-area-m2", nargs="*", type=float, default=[])
    ap.add_argument("--tta", nargs="*", choices=["none", "flip"], default=[], help="test-time augmentations to compare")
    ap.add_argument("--out", default="bench/tune_postprocess.json")
    args = ap.parse_args()

    cfg = load_train_config(args.config)
    held_out = {s.place for s in cfg.scenes if s.split == "holdout"}
    if set(args.places) & held_out:
        raise SystemExit(f"{sorted(set(args.places) & held_out)} are held out: tune on training places only")
    spec, model = load_trained(resolve(args.model or cfg.out, cfg.base_dir))
    grid = {
        k: v
        for k, v in {
            "threshold": args.threshold,
            "seed_threshold": args.seed_threshold,
            "mask_threshold": args.mask_threshold,
            "min_area_m2": args.min_area_m2,
        }.items()
        if v
    }
    decodings = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    # The network runs once per scene and augmentation; each decoding then reuses its probabilities.
    ttas = args.tta or [spec.tta or "none"]
    settings = [{"tta": tta, **d} for tta in ttas for d in decodings]
    totals = {i: [0, 0, 0] for i in range(len(settings))}
    with tempfile.TemporaryDirectory() as tmp:
        for i, scene_spec in enumerate(cfg.scenes):
            if scene_spec.place not in args.places:
                continue
            scene = load_scene(cfg, scene_spec, Path(tmp), i)
            hw = head_windows(cfg.eval_window, cfg.eval_overlap, 1.0, scene.image.shape[-1], scene.image.shape[-2])
            probs = {
                tta: (blend_image(model, spec, scene.image, scene.valid, hw, tta) * 255).round().astype(np.uint8)
                for tta in ttas
            }
            truth = np.where(scene.valid, scene.target, 0)
            pixel_m2 = _pixel_m(cfg, scene) ** 2
            for k, setting in enumerate(settings):
                s = spec.model_copy(update=setting)
                labels = decode_instances(probs[setting["tta"]], scene.valid, s)
                if s.min_area_m2 > 0:
                    sizes = np.bincount(labels.ravel()) * pixel_m2
                    labels = np.where(sizes[labels] >= s.min_area_m2, labels, 0)
                m = match_instances(labels, truth, cfg.eval_iou)
                t = totals[k]
                t[0], t[1], t[2] = t[0] + m["matched"], t[1] + m["predicted"], t[2] + m["truth"]
    rows: list[dict[str, Any]] = [
        {**settings[k], **prf(tp, n_pred, n_truth, cfg.eval_iou)} for k, (tp, n_pred, n_truth) in totals.items()
    ]
    rows.sort(key=lambda r: r["f1"])
    for r in rows:
        print(json.dumps(r))
    Path(args.out).write_text(json.dumps({"config": args.config, "places": args.places, "settings": rows}, indent=2))


if __name__ == "__main__":
    main()
