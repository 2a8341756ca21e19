"""Run ``geoseg.pipeline.run`` on a multi-node Ray cluster started on this machine.

``python tests/helpers/cluster_run.py CONFIG OVERRIDES_JSON OUT REPORT_JSON INPUT...``: a head with no CPU and two
one-CPU worker nodes (``ray.cluster_utils.Cluster``, all on 127.0.0.1), in a process of its own
because a process holds one Ray connection and the test session already has a local Ray.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    config_path, overrides, out, report_path, *inputs = sys.argv[1:]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.cluster_utils import Cluster

    from geoseg.config import load_config
    from geoseg.pipeline import run

    store = 150 * 1024**2
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": store,
                                                           "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=store)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        report = run(inputs, out, load_config(config_path, json.loads(overrides)), progress=False)
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        with open(report_path, "w") as fh:
            json.dump({"ok": report.ok, "failures": report.failures, "writer_nodes": report.writer_nodes,
                       "nodes": nodes}, fh)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
