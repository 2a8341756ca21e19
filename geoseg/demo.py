"""``make demo``: the main job on bundled sample data, then its summary and accuracy.

Sample data: a synthetic scene generated here (exact truth beside it), run with the default
models (trained on such scenes). Outputs land in ``out/demo/``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "out" / "demo"


def _print_summary(summary: dict) -> None:
    print(f"\n{summary['input']}  ({summary['width']}x{summary['height']}, {summary['crs']}, {summary['seconds']} s)")
    for model, m in summary["models"].items():
        for cls, v in m["classes"].items():
            count = f"{v['count']:>6} objects" if "count" in v else " " * 13
            print(f"  {model:<10} {cls:<10} {count} {v['pixels']:>10} px {v['area_m2'] / 1e4:>12.2f} ha")


def main() -> int:
    from geoseg.config import load_config
    from geoseg.pipeline import run
    from geoseg.synth import write_scene

    scenes = DEMO / "scenes"
    scenes.mkdir(parents=True, exist_ok=True)
    synth = scenes / "synthetic.tif"
    if not synth.exists():
        print(f"writing synthetic scene {synth}")
        write_scene(synth, size=2048, seed=7)
    config = load_config(REPO / "configs" / "default.yaml")
    report = run([str(scenes)], DEMO / "out", config)
    for summary in report.summaries:
        _print_summary(summary)
    for path, error in report.failures:
        print(f"failed: {error}")
    print(f"\n{report.megapixels:.1f} Mpx in {report.seconds:.1f} s; outputs in {DEMO / 'out'} "
          f"(open the .gpkg and .tif files in QGIS)")
    _print_accuracy(DEMO / "out" / "synthetic", synth.with_suffix(".truth"))
    print(f"\nreport (open it in a browser): {report.report_path}")
    return 0 if report.ok else 1


def _print_accuracy(out_dir: Path, truth_dir: Path) -> None:
    from geoseg.evaluate import format_scores, score_synthetic

    if not out_dir.exists():
        return
    scores = score_synthetic(out_dir, truth_dir)
    (out_dir.parent / "accuracy.json").write_text(json.dumps(scores, indent=2))
    print("\naccuracy on the synthetic scene against its exact truth (land use: pixel IoU; objects: IoU >= 0.5):")
    print(format_scores(scores))


if __name__ == "__main__":
    sys.exit(main())
