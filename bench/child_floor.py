"""The whole-job memory a run has before its first tile: what no per-pixel change can lower.

Starts geoseg's processes the way ``geoseg.runner.pipeline`` does (a local Ray, the model actors with
their models built and checked, the scene writers, a read/post-processing task worker with its
libraries imported) and takes, with ``bench.procmon.Monitor``, one sample of the same whole-job
figure the other sections report (driver RSS + PSS of every Ray process) at three moments:

- ``driver``: the driver with geoseg imported, before Ray;
- ``ray``: a local Ray started, nothing of geoseg's in it (Ray's own processes and its idle workers);
- ``ready``: every geoseg process started and ready, no tile sent.

``python -m bench.child_floor --config CONFIG.json --base-dir REPO --num-cpus N --json OUT``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from bench.procmon import Monitor, rss_kb

SETTLE_S = 2.0  # after starting processes: let their imports and Ray's registrations finish


def _sample(pid: int) -> dict[str, object]:
    mon = Monitor(pid)
    mon.sample()
    figures = mon.figures()
    keep = (
        "whole_job_peak_mib",
        "whole_job_peak_all_pss_mib",
        "whole_job_peak_split_mib",
        "whole_job_peak_processes_pss_mib",
        "whole_job_peak_processes_pss_parts_mib",
    )
    return {k: figures[k] for k in keep}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="JSON file: the config dict (config_from_dict)")
    ap.add_argument("--base-dir", default=os.getcwd())
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from geoseg.core.config import config_from_dict
    from geoseg.core.s3 import storage_env
    from geoseg.core.storage import OutputStore
    from geoseg.runner.actors import start_model_actors, start_writers, task_cpus, wait_ready
    from geoseg.runner.local_ray import ensure_ray
    from geoseg.runner.workers import warm_up_worker

    with open(args.config) as fh:
        config = config_from_dict(json.load(fh), "<bench>", base_dir=args.base_dir)
    pid = os.getpid()
    out: dict[str, object] = {"driver": {"driver_rss_mib": round(rss_kb(pid) / 1024, 1)}}
    ensure_ray(num_cpus=args.num_cpus)  # a local Ray as a run starts it, without the services it leaves out
    time.sleep(SETTLE_S)
    out["ray"] = _sample(pid)
    with tempfile.TemporaryDirectory() as tmp:
        actors = start_model_actors(config)
        writers = start_writers(config, OutputStore(tmp), storage_env())
        ray.get(ray.remote(num_cpus=task_cpus())(warm_up_worker).remote())
        out["device"] = wait_ready(actors)
        ray.get([w.node.remote() for w in writers])
        time.sleep(SETTLE_S)
        out["ready"] = _sample(pid)
        for actor in [*actors, *writers]:
            ray.kill(actor)
    ray.shutdown()
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
