"""bf16 against float32 for the shipped models (a subprocess of ``bench.run``, section ``precision``).

Each ``--case CONFIG=INPUT`` runs twice through ``geoseg.runner.pipeline.run`` in one local Ray, with
``runtime.precision`` fp32 and bf16 (device cpu), and compares the outputs: class masks pixel by
pixel (valid pixels), instance heads by object count and by the pixels that are objects in one run
and not the other; each run's wall time too. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import rasterio


def _masks(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for tif in sorted(folder.glob("*.tif")):
        head = tif.stem.rsplit("_", 1)[-1]
        with rasterio.open(tif) as ds:
            out[head] = ds.read(1)
    return out


def compare(case: str, config_path: str, raster: str, out: Path) -> dict[str, object]:
    from geoseg.core.config import load_config
    from geoseg.runner.pipeline import run

    runs: dict[str, dict[str, object]] = {}
    masks: dict[str, dict[str, np.ndarray]] = {}
    for precision in ("fp32", "bf16"):
        config = load_config(config_path, {"runtime": {"precision": precision, "device": "cpu"}})
        started = time.monotonic()
        report = run([raster], out / precision, config, progress=False)
        runs[precision] = {
            "ok": report.ok,
            "wall_s": round(time.monotonic() - started, 2),
            "device": report.device,
            "failures": [str(e)[:300] for _, e in report.failures],
        }
        if not report.ok:
            raise RuntimeError(f"{precision} run failed: {runs[precision]['failures']}")
        folder = next((out / precision).glob("*/summary.json")).parent
        masks[precision] = _masks(folder)
        summary = json.loads((folder / "summary.json").read_text())
        runs[precision]["counts"] = {
            m: {c: v.get("count") for c, v in d["classes"].items()}
            for m, d in summary["models"].items()
            if d["task"] == "instance"
        }
        tasks = {m: d["task"] for m, d in summary["models"].items()}
    heads = {}
    for head, a in masks["fp32"].items():
        b = masks["bf16"][head]
        if tasks.get(head) == "semantic":
            valid = a != 255
            heads[head] = {"task": "semantic", "agreement": round(float(np.mean(a[valid] == b[valid])), 5)}
        elif head in tasks:
            either = (a > 0) | (b > 0)
            heads[head] = {
                "task": "instance",
                "object_pixels_agree": round(float(np.mean((a > 0)[either] == (b > 0)[either])), 5)
                if either.any()
                else 1.0,
            }
    return {
        "case": case,
        "config": config_path,
        "input": raster,
        "runs": runs,
        "heads": heads,
        "speedup_bf16": round(float(runs["fp32"]["wall_s"]) / float(runs["bf16"]["wall_s"]), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", action="append", required=True, help="NAME=CONFIG=INPUT")
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    results = []
    for spec in args.case:
        name, config, raster = spec.split("=", 2)
        try:
            results.append(compare(name, config, raster, Path(args.out) / name))
        except Exception as exc:  # noqa: BLE001 (one case failing must not lose the others)
            results.append({"case": name, "error": f"{type(exc).__name__}: {exc}"[:500]})
    import ray

    ray.shutdown()
    Path(args.json).write_text(json.dumps({"cases": results}, indent=2))


if __name__ == "__main__":
    main()
