"""``make demo``: the main job on sample data, then its summary and accuracy.

Two scenes: a synthetic one generated here (exact truth beside it), run with the synthetic-scene
models (``configs/synthetic.yaml``); and a real place no model here was trained on, a 4096 px crop of
HOT's Nairobi drone imagery from ``../shared/data`` (where it is present) averaged from 0.075 m to
0.3 m (as drone imagery is often delivered; the building model's pixel size), run with the default
config (the aerial models) and scored against its OpenStreetMap building outlines. Outputs land in
``out/demo/``; the report shows both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "out" / "demo"
SHARED = REPO.parent / "shared" / "data"
# Held out of the building model's training (configs/train/aerial-buildings.yaml): its densest
# 4096 x 4096 block of imagery, at 0.075 m.
REAL_IMAGE = SHARED / "hotosm_buildings" / "nairobi.tif"
REAL_OUTLINES = SHARED / "hotosm_buildings" / "nairobi_buildings.geojson"
REAL_WINDOW = (14336, 0, 4096, 4096)  # col, row, width, height
REAL_FACTOR = 4  # 0.075 m -> 0.3 m


def _print_summary(summary: dict) -> None:
    print(f"\n{summary['input']}  ({summary['width']}x{summary['height']}, {summary['crs']}, {summary['seconds']} s)")
    for model, m in summary["models"].items():
        for cls, v in m["classes"].items():
            count = f"{v['count']:>6} objects" if "count" in v else " " * 13
            print(f"  {model:<10} {cls:<10} {count} {v['pixels']:>10} px {v['area_m2'] / 1e4:>12.2f} ha")


def main() -> int:
    from geoseg.core.config import load_config
    from geoseg.runner.pipeline import run
    from geoseg.train.synth import write_scene

    scenes = DEMO / "scenes"
    scenes.mkdir(parents=True, exist_ok=True)
    synth = scenes / "synthetic.tif"
    if not synth.exists():
        print(f"writing synthetic scene {synth}")
        write_scene(synth, size=2048, seed=7)
    report = run([str(scenes)], DEMO / "out", load_config(REPO / "configs" / "synthetic.yaml"))
    for summary in report.summaries:
        _print_summary(summary)
    for _path, error in report.failures:
        print(f"failed: {error}")
    print(
        f"\n{report.megapixels:.1f} Mpx in {report.seconds:.1f} s; outputs in {DEMO / 'out'} "
        f"(open the .gpkg and .tif files in QGIS)"
    )
    _print_accuracy(DEMO / "out" / "synthetic", synth.with_suffix(".truth"))
    ok = report.ok
    real = _real_scene(DEMO / "real")
    if real is None:
        print(f"\n(no real imagery at {REAL_IMAGE}: the real-imagery part is skipped)")
    else:
        print(f"\nreal imagery, a place the models never saw: {real.name} with the default config (aerial models)")
        report = run([str(real)], DEMO / "out", load_config(REPO / "configs" / "default.yaml"))
        for summary in report.summaries:
            _print_summary(summary)
        for _path, error in report.failures:
            print(f"failed: {error}")
        ok = ok and report.ok
        _print_real_scores(DEMO / "out" / real.stem / f"{real.stem}.gpkg", real)
    print(f"\nreport (open it in a browser): {report.report_path}")
    return 0 if ok else 1


def _real_scene(folder: Path) -> Path | None:
    """The demo's real scene: a crop of the held-out drone image, with its imagery mask."""
    import rasterio
    from rasterio.windows import Window

    if not REAL_IMAGE.exists():
        return None
    path = folder / "nairobi_crop.tif"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    from rasterio.enums import Resampling

    window = Window(*REAL_WINDOW)
    f = REAL_FACTOR
    shape = (int(window.height) // f, int(window.width) // f)
    with rasterio.open(REAL_IMAGE) as src:
        profile = src.profile
        transform = src.window_transform(window) * src.window_transform(window).scale(f, f)
        profile.update(
            width=shape[1],
            height=shape[0],
            transform=transform,
            driver="GTiff",
            compress="deflate",
            photometric="rgb",
            tiled=True,
            blockxsize=256,
            blockysize=256,
        )
        image = src.read(window=window, out_shape=(src.count, *shape), resampling=Resampling.average)
        mask = src.dataset_mask(window=window, out_shape=shape, resampling=Resampling.nearest)
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
            dst.write(image)
            dst.write_mask(mask)
    return path


def _print_real_scores(gpkg: Path, scene: Path) -> None:
    """Buildings found against OpenStreetMap's outlines, counted where the crop has imagery."""
    import geopandas as gpd
    import rasterio

    from geoseg.train.evaluate import distinct_outlines, match_polygons, on_imagery

    if not gpkg.exists():
        return
    with rasterio.open(scene) as ds:
        crs, bounds, mask, transform = ds.crs, ds.bounds, ds.dataset_mask(), ds.transform
    truth = gpd.read_file(REAL_OUTLINES).to_crs(crs).clip(bounds)
    found = gpd.read_file(gpkg, layer="buildings")
    scores = match_polygons(
        on_imagery(found.geometry, mask, transform),
        distinct_outlines(on_imagery(truth.geometry, mask, transform)),
        0.5,
    )
    (DEMO / "out" / "real_accuracy.json").write_text(json.dumps(scores, indent=2))
    print(
        "\nbuildings against OpenStreetMap outlines (IoU >= 0.5, where there is imagery): "
        f"{scores['predicted']} found, {scores['truth']} true, {scores['matched']} matched; "
        f"precision {scores['precision']:.2f}, recall {scores['recall']:.2f}, F1 {scores['f1']:.2f}"
    )


def _print_accuracy(out_dir: Path, truth_dir: Path) -> None:
    from geoseg.train.evaluate import format_scores, score_synthetic

    if not out_dir.exists():
        return
    scores = score_synthetic(out_dir, truth_dir)
    (out_dir.parent / "accuracy.json").write_text(json.dumps(scores, indent=2))
    print("\naccuracy on the synthetic scene against its exact truth (land use: pixel IoU; objects: IoU >= 0.5):")
    print(format_scores(scores))


if __name__ == "__main__":
    sys.exit(main())
