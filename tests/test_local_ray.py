"""The local Ray a run starts: its workers allocate with Ray's jemalloc, the model actor keeps its
freed pages within a call and returns them between calls, and the driver's own environment is
left as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

# Run in a fresh interpreter: the test session's own Ray (conftest) is started without geoseg.
SCRIPT = textwrap.dedent(
    """
    import json, os, ray
    from geoseg.core.config import load_config
    from geoseg.runner.actors import model_actor
    from geoseg.runner.local_ray import ensure_ray

    def allocator():
        from geoseg.runner.jemalloc import decay_ms
        return {"jemalloc": "libjemalloc" in open("/proc/self/maps").read(), "decay_ms": decay_ms()}

    def freed_after_a_call():
        # what a model call leaves: 64 MiB of buffers freed; then what the actor does between calls
        import numpy as np
        from geoseg.runner.jemalloc import freed_bytes, release_freed_pages
        buffers = [np.ones(2**20) for _ in range(8)]
        del buffers
        held = freed_bytes()
        release_freed_pages()
        return {"held": held, "after_release": freed_bytes()}

    ensure_ray(num_cpus=2)
    task = ray.get(ray.remote(allocator).remote())
    node = ray.get_runtime_context().get_node_id()
    actor = model_actor(load_config("configs/synthetic-oracle.yaml"), node)
    in_actor = ray.get(actor.__ray_call__.remote(lambda self: allocator()))
    in_actor.update(ray.get(actor.__ray_call__.remote(lambda self: freed_after_a_call())))
    print(json.dumps({"task": task, "actor": in_actor, "driver_env": os.environ.get("RAY_LD_PRELOAD_ON_WORKERS"),
                      "driver_jemalloc": allocator()["jemalloc"]}))
    """
)


def _fresh(script: str, env_extra: dict[str, str], unset: tuple[str, ...]) -> dict:
    """Run ``script`` in a fresh interpreter without the variables ``unset`` (and without
    RAY_ADDRESS, so that it starts its own Ray); the JSON of its last output line."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *unset)}
    env.update(RAY_AUTH_MODE="disabled", **env_extra)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240, cwd=os.getcwd()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run(env_extra: dict[str, str]) -> dict:
    return _fresh(SCRIPT, env_extra, ("RAY_LD_PRELOAD_ON_WORKERS",))


def test_local_ray_workers_use_jemalloc_and_the_model_actor_keeps_freed_pages_within_a_call():
    seen = _run({})
    assert seen["task"]["jemalloc"] and seen["actor"]["jemalloc"]
    assert seen["actor"]["decay_ms"] == -1  # the model actor keeps freed pages for reuse ...
    assert seen["task"]["decay_ms"] == 10_000  # other workers return them (jemalloc's default decay)
    # ... within a call; between calls it returns them (64 MiB freed in the probe)
    assert seen["actor"]["held"] >= 32 * 2**20 and seen["actor"]["after_release"] < 4 * 2**20
    assert seen["driver_env"] is None and not seen["driver_jemalloc"]  # the driver is left as it was


def test_the_user_can_keep_glibc_malloc_in_workers():
    seen = _run({"RAY_LD_PRELOAD_ON_WORKERS": "0"})
    assert not seen["task"]["jemalloc"] and not seen["actor"]["jemalloc"]
    assert seen["actor"]["decay_ms"] is None
    assert seen["driver_env"] == "0"


SERVICES_SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, ray
    from geoseg.runner.local_ray import ray_for_run

    with ray_for_run(None):
        total = ray.get([ray.remote(lambda x: x + 1).remote(i) for i in range(4)])
        children = subprocess.run(["ps", "-o", "args=", "--ppid", str(os.getpid())], capture_output=True, text=True)
    # Ray's own Node again once the local Ray is up: a Ray started later in this process is Ray's.
    restored = all(getattr(ray._private.node.Node, m).__module__ == "ray._private.node"
                   for m in ("start_monitor", "start_log_monitor", "start_api_server"))
    print(json.dumps({"total": sum(total), "children": children.stdout.splitlines(), "restored": restored}))
    """
)


def _children(env_extra: dict[str, str]) -> dict:
    seen = _fresh(SERVICES_SCRIPT, env_extra, ("GEOSEG_KEEP_RAY_SERVICES",))
    seen["scripts"] = {os.path.basename(w) for a in seen["children"] for w in a.split() if w.endswith(".py")}
    return seen


def test_a_local_run_leaves_out_the_ray_services_it_does_not_use():
    seen = _children({})
    assert seen["total"] == 10  # tasks still run
    assert seen["restored"]
    assert not any("monitor.py" in a or "dashboard.py" in a for a in seen["children"]), seen["children"]
    assert any("gcs_server" in a for a in seen["children"]) and any("raylet" in a for a in seen["children"])
    kept = _children({"GEOSEG_KEEP_RAY_SERVICES": "1"})
    assert kept["total"] == 10
    assert {"monitor.py", "log_monitor.py", "dashboard.py"} <= kept["scripts"], kept["children"]
