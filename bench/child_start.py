"""Start-up as a user meets it (a subprocess of ``bench.run``): what ``geoseg run IMAGE --out DIR -q`` does.

Loads the ``--config`` (``bench.run``: ``configs/synthetic.yaml``) with ``load_config`` and calls
``geoseg.runner.pipeline.run(..., progress=False)`` exactly as the CLI does (``-q``); ``run`` starts
the local Ray itself. Times are counted from this process's start (``/proc/self/stat``), so interpreter
start and imports count:

- ``first_tile_s``: ``RunReport.first_tile_unix`` - process start;
- ``total_s``: ``run`` returned - process start;
- ``imports_s``: ``RunReport.started_unix`` - process start (interpreter, geoseg, Ray, config).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from bench.procmon import process_start_unix


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    start = process_start_unix()

    from geoseg.core.config import load_config
    from geoseg.runner.pipeline import run

    config = load_config(args.config, {"tiling": {}, "runtime": {}})
    report = run([args.input], args.out, config, progress=False)
    returned = time.time()
    first = getattr(report, "first_tile_unix", None) or (report.progress[0][0] if report.progress else None)
    out = {
        "ok": report.ok,
        "failures": [[str(p), str(e)[:500]] for p, e in report.failures][:5],
        "tiles": report.tiles,
        "megapixels": round(report.megapixels, 3),
        "first_tile_s": round(first - start, 3) if first else None,
        "total_s": round(returned - start, 3),
        "imports_s": round(report.started_unix - start, 3) if report.started_unix else None,
        "run_seconds": round(report.seconds, 3),
        "process_start_unix": round(start, 3),
        "pid": os.getpid(),
    }
    import ray

    ray.shutdown()
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
