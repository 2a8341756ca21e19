"""Cluster entry points (issue 8): the KubeRay manifests in jobs/ validate against KubeRay's CRDs and
run the command the READMEs show, the README's two-node `ray start` + `ray job submit` block runs as
written, and the wheel carries the default config and models (installed in a fresh environment,
`geoseg run` without --config works from outside the checkout)."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# KubeRay's generated CRDs (unmodified, see its README.md), beside the checkout like ../shared/data.
KUBERAY_CRDS = REPO.parent / "shared" / "kuberay-crds"
JOBS = REPO / "jobs"
MANIFESTS = {"rayjob.yaml": "ray.io_rayjobs.yaml", "raycronjob.yaml": "ray.io_raycronjobs.yaml"}


@pytest.fixture(scope="module")
def kuberay_crds() -> Path:
    """``../shared/kuberay-crds``; the schema tests skip without it."""
    if not KUBERAY_CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY_CRDS} (the shared/ folder beside the checkout)")
    return KUBERAY_CRDS


def _manifest(name: str) -> dict:
    return yaml.safe_load((JOBS / name).read_text())


def _strict(schema):
    """The schema as `kubectl apply --validate=strict` applies it: an unknown field fails.

    A structural CRD schema prunes unknown fields instead (silently, or with a warning), so a typo
    such as ``shutdownAfterJobFinish`` would pass plain jsonschema; objects that list their fields
    and keep no unknown ones get ``additionalProperties: false``.
    """
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _load_crd(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1.4 MB of YAML


def _crd_schema(crds: Path, manifest: dict, crd_file: str) -> dict:
    crd = _load_crd(crds / crd_file)
    group, version = manifest["apiVersion"].split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == manifest["kind"]
    served = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    assert served, f"{crd_file} serves no {manifest['apiVersion']}"
    return _strict(served[0]["schema"]["openAPIV3Schema"])


def _errors(schema: dict, manifest: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest))


def _cel_rules_reached(schema, value, path: str = "") -> list[str]:
    """Fields the manifest sets whose schema carries CEL rules (x-kubernetes-validations), which
    jsonschema cannot evaluate: none may be reached, or the validation here would be incomplete."""
    if not isinstance(schema, dict):
        return []
    found = [f"{path}: {r['rule']}" for r in schema.get("x-kubernetes-validations", [])]
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            found += _cel_rules_reached(sub, item, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += _cel_rules_reached(schema["items"], item, f"{path}[{i}]")
    return found


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_validates_against_kuberay_crd(kuberay_crds, name):
    manifest = _manifest(name)
    schema = _crd_schema(kuberay_crds, manifest, MANIFESTS[name])
    assert _errors(schema, manifest) == []
    assert _cel_rules_reached(schema, manifest) == []


def _broken_manifests() -> list[tuple[str, str, callable]]:
    def wrong_type(m):
        spec = m["spec"].get("jobTemplate", m["spec"])
        spec["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"

    def typo(m):
        spec = m["spec"].get("jobTemplate", m["spec"])
        spec["shutdownAfterJobFinish"] = spec.pop("shutdownAfterJobFinishes")

    def missing_required(m):
        del m["spec"].get("jobTemplate", m["spec"])["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"]

    def bad_enum(m):
        m["spec"].get("jobTemplate", m["spec"])["rayClusterSpec"]["authOptions"]["mode"] = "password"

    cases = [
        ("wrong_type", "replicas", wrong_type),
        ("typo", "shutdownAfterJobFinish", typo),
        ("missing_required", "minReplicas", missing_required),
        ("bad_enum", "password", bad_enum),
    ]
    return [(name, *case) for name in sorted(MANIFESTS) for case in cases] + [
        ("raycronjob.yaml", "no_schedule", "schedule", lambda m: m["spec"].pop("schedule"))
    ]


@pytest.mark.parametrize(
    ("name", "case", "expected", "breaks"), _broken_manifests(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_broken_manifest_fails_validation(kuberay_crds, name, case, expected, breaks):
    """The validation can fail: each deliberate mistake is reported, naming the field."""
    manifest = copy.deepcopy(_manifest(name))
    breaks(manifest)
    errors = _errors(_crd_schema(kuberay_crds, manifest, MANIFESTS[name]), manifest)
    assert errors and any(expected in e for e in errors), (case, errors)


def _fenced_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", markdown, flags=re.S | re.M)


def _submit_entrypoint(block: str) -> str:
    """The entry point of the block's `ray job submit ... -- ENTRYPOINT` line."""
    lines = [line for line in block.splitlines() if line.startswith("ray job submit ")]
    assert len(lines) == 1, block
    return lines[0].split(" -- ", 1)[1].strip()


def _readme_cluster_block() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Run on a cluster\n", 1)[1].split("\n## ", 1)[0]
    blocks = [b for b in _fenced_blocks(section) if "ray job submit " in b]
    assert len(blocks) == 1, "README's 'Run on a cluster' needs one block with `ray job submit`"
    return blocks[0]


def _jobs_readme_entrypoint() -> str:
    blocks = [b for b in _fenced_blocks((JOBS / "README.md").read_text()) if "ray job submit " in b]
    assert len(blocks) == 1, "jobs/README.md needs one block with `ray job submit`"
    return _submit_entrypoint(blocks[0])


def _job_specs() -> dict[str, dict]:
    """The RayJob spec of each manifest (a RayCronJob's jobTemplate)."""
    job = _manifest("rayjob.yaml")
    cron = _manifest("raycronjob.yaml")
    assert (job["kind"], cron["kind"]) == ("RayJob", "RayCronJob")
    return {"rayjob.yaml": job["spec"], "raycronjob.yaml": cron["spec"]["jobTemplate"]}


def test_manifests_run_the_readme_entry_point():
    specs = _job_specs()
    documented = _jobs_readme_entrypoint()
    for name, spec in specs.items():
        assert spec["entrypoint"] == documented, name
    assert specs["raycronjob.yaml"] == specs["rayjob.yaml"], "the RayCronJob's jobTemplate must be the RayJob's spec"
    # The README's local run and the manifests run the same script with the same arguments (paths
    # differ); the README's run names the synthetic config too (its scene is synthetic), the
    # manifests take the packaged default.
    local = shlex.split(_submit_entrypoint(_readme_cluster_block()))
    cluster = shlex.split(documented)
    assert local[:2] == cluster[:2] == ["bash", "jobs/nightly.sh"] and len(local) == len(cluster) + 1
    assert local[-1] == "configs/synthetic.yaml"
    assert (REPO / cluster[1]).is_file()


def _dockerfile() -> dict:
    """What jobs/Dockerfile documents and does: image name, Ray version, working dir, copies."""
    text = (JOBS / "Dockerfile").read_text()
    image = re.findall(r"^#\s+docker build -f jobs/Dockerfile -t (\S+) \.$", text, flags=re.M)
    assert len(image) == 1, "jobs/Dockerfile must document its one `docker build ... -t IMAGE .`"
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) == 2, "a wheel stage and the image stage"

    def copies(stage):
        return [shlex.split(line)[1:] for line in stage.splitlines() if line.startswith("COPY ")]

    return {
        "image": image[0],
        "ray_version": re.search(r"^ARG RAY_VERSION=(\S+)$", text, flags=re.M)[1],
        "bases": [s.splitlines()[0] for s in stages],
        "workdir": re.findall(r"^WORKDIR (\S+)$", stages[1], re.M)[-1],
        "wheel_copies": copies(stages[0]),
        "image_copies": copies(stages[1]),
    }


def _containers(spec: dict) -> list[dict]:
    cluster = spec["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    if "submitterPodTemplate" in spec:
        templates.append(spec["submitterPodTemplate"])
    return [c for t in templates for c in t["spec"]["containers"]]


def test_manifests_name_the_image_the_dockerfile_builds():
    import ray

    docker = _dockerfile()
    version = re.search(r'^version = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), flags=re.M)[1]
    assert docker["image"] == f"geoseg:{version}"
    assert docker["ray_version"] == ray.__version__, "the image's Ray must be the Ray that submits jobs"
    assert all(b.startswith("rayproject/ray:${RAY_VERSION}-py311") for b in docker["bases"]), docker["bases"]
    assert [c for c in docker["image_copies"] if c[-2:] == ["jobs/", "jobs/"]], "the image must carry jobs/"
    for name, spec in _job_specs().items():
        assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__, name
        assert {c["image"] for c in _containers(spec)} == {docker["image"]}, name
        # The entry point runs in the image's copy of jobs/ (the submitter uploads it as working_dir).
        assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"working_dir": docker["workdir"]}, name


def test_nightly_script_builds_the_documented_command(tmp_path):
    """jobs/nightly.sh with a stand-in `geoseg` on PATH: the arguments it passes."""
    fake = tmp_path / "bin" / "geoseg"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "RAY_ADDRESS=$RAY_ADDRESS" "$@"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{fake.parent}:{env['PATH']}"

    def nightly(*args: str) -> list[str]:
        run = subprocess.run(["bash", "jobs/nightly.sh", *args], cwd=REPO, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return run.stdout.splitlines()

    out = nightly("/data/scenes", "/data/out")
    assert out == ["RAY_ADDRESS=auto", "run", "/data/scenes", "--out", "/data/out", "--recursive"]
    env["RAY_ADDRESS"] = "10.0.0.1:6379"
    out = nightly("s", "o", "my config.yaml")
    assert out[0] == "RAY_ADDRESS=10.0.0.1:6379" and out[-2:] == ["--config", "my config.yaml"]
    # SCENES '-': no scenes, the config's saved STAC API search alone.
    out = nightly("-", "o", "search.yaml")
    assert out[1:] == ["run", "--out", "o", "--config", "search.yaml"]
    alone = subprocess.run(["bash", "jobs/nightly.sh", "-", "o"], cwd=REPO, env=env, capture_output=True, text=True)
    assert alone.returncode == 2 and "needs a CONFIG" in alone.stderr


# --- the README's two-node cluster, as typed --------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, pgid, sid) for every process this user can see."""
    table = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(d.name)] = (int(fields[1]), int(fields[2]), int(fields[3]))
    return table


def _stop_session(sid: int, grace: float = 3.0) -> None:
    """End every process of the session the block ran in (its `ray start` processes keep it) and
    their descendants (workers, the job's driver), by pid: never `ray stop`, which would stop every
    Ray of this user on the machine (other test sessions included)."""
    table = _proc_table()
    ours = {pid for pid, (_, _, s) in table.items() if s == sid}
    grew = True
    while grew:
        kids = {pid for pid, (ppid, _, _) in table.items() if ppid in ours} - ours
        ours |= kids
        grew = bool(kids)
    ours.discard(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5)
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in ours):
            time.sleep(0.2)
            for p in ours:  # reap any that are our own children
                try:
                    os.waitpid(p, os.WNOHANG)
                except ChildProcessError:
                    pass


def _local_cluster_script(block: str, temp_dir: Path, data: Path) -> str:
    """The README block with this test's ports and folders; `ray stop` left to the test (see _stop_session)."""
    lines = [line for line in block.splitlines() if line.strip()]
    assert lines[-1].strip() == "ray stop", "the README block ends with `ray stop`"
    script = "\n".join(lines[:-1])
    for needle in ("6379", "8265", "/tmp/geoseg", "ray start --head ", "ray start --address "):
        assert script.count(needle) >= 1, needle
    gcs, dashboard, client, head_agent, node_agent = _free_ports(5)
    script = script.replace("6379", str(gcs)).replace("8265", str(dashboard)).replace("/tmp/geoseg", str(data))
    # Only to keep clear of other Ray sessions on this machine (other tests', other users'): a private
    # temp dir, and free ports where Ray's defaults are fixed (client server 10001, agents' HTTP 52365:
    # a head whose agent cannot bind it accepts no job).
    script = script.replace(
        "ray start --head ",
        f"ray start --head --temp-dir {temp_dir} --ray-client-server-port "
        f"{client} --dashboard-agent-listen-port {head_agent} ",
        1,
    )
    return script.replace("ray start --address ", f"ray start --dashboard-agent-listen-port {node_agent} --address ", 1)


def test_readme_two_node_cluster_runs_the_entry_point(tmp_path):
    from geoseg.train.evaluate import score_synthetic

    block = _readme_cluster_block()
    assert _submit_entrypoint(block).startswith("bash jobs/nightly.sh ")
    temp_dir = Path(tempfile.mkdtemp(prefix="gsr", dir="/tmp"))  # short: Ray's socket paths have a length limit
    data = tmp_path / "data"
    script = tmp_path / "cluster.sh"
    script.write_text("set -euxo pipefail\n" + _local_cluster_script(block, temp_dir, data) + "\n")
    gcs_port = re.search(r"ray start --head .*--port (\d+)", script.read_text())[1]
    home = tmp_path / "home"  # `ray get-auth-token --generate` writes $HOME/.ray/auth_token
    home.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_", "VIRTUAL_ENV")) and k not in ("PYTHONPATH", "PYTHONHOME")
    }
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen(
        ["bash", str(script)],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        try:
            log, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            log = proc.communicate()[0]
            pytest.fail("the README's cluster block ran past 300 s:\n" + log[-6000:])
        assert proc.returncode == 0, log[-6000:]
        assert re.search(r"Job '\S+' succeeded", log), log[-6000:]
        status = subprocess.run(
            ["ray", "status", "--address", f"127.0.0.1:{gcs_port}"],
            cwd=REPO,
            env={**env, "RAY_AUTH_MODE": "token", "PATH": f"{REPO / '.venv' / 'bin'}:{env['PATH']}"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        active = status.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        assert len(re.findall(r"\bnode_[0-9a-f]+", active)) == 2, status.stdout + status.stderr
    finally:
        _stop_session(proc.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)

    out = data / "out"
    scenes = [p for p in (data / "scenes").glob("*.tif")]
    assert len(scenes) == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["run-manifest.json", "runs", "summary.csv", "collection.json", "report.html", scenes[0].stem]
    )
    scene_out = out / scenes[0].stem
    summary = json.loads((scene_out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["input"] == str(scenes[0])
    _check_scene_outputs(scene_out, scenes[0])
    scores = score_synthetic(scene_out, scenes[0].with_suffix(".truth"))
    assert scores["landuse"]["mean_iou"] > 0.9, scores
    assert scores["buildings"]["f1"] >= 0.9 and scores["ships"]["f1"] >= 0.9, scores


def _check_scene_outputs(scene_out: Path, scene: Path) -> None:
    import pyogrio
    import rasterio

    with rasterio.open(scene) as src:
        shape, transform, crs = src.shape, src.transform, src.crs
    for head in ("landuse", "buildings", "ships"):
        with rasterio.open(scene_out / f"{scene.stem}_{head}.tif") as mask:
            assert (mask.shape, mask.transform, mask.crs) == (shape, transform, crs), head
            assert mask.read(1).any(), head
    layers = {name for name, _ in pyogrio.list_layers(scene_out / f"{scene.stem}.gpkg")}
    assert {"landuse", "buildings", "ships", "counts"} <= layers, layers


# --- the wheel ------------------------------------------------------------------------------------


def _copy_like_docker(copies: list[list[str]], dest: Path) -> None:
    """Docker's COPY for the wheel stage of jobs/Dockerfile (symlinks kept, .dockerignore's caches out)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for args in copies:
        paths = [a for a in args if not a.startswith("--")]
        *sources, target = paths
        target_dir = dest / target
        for source in sources:
            src = REPO / source
            if src.is_dir():
                shutil.copytree(src, target_dir, symlinks=True, ignore=ignore, dirs_exist_ok=True)
            else:
                target_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target_dir / src.name, follow_symlinks=False)


def test_wheel_carries_default_config_and_models(tmp_path):
    """Build the wheel from what jobs/Dockerfile copies, install it alone in a fresh venv (its heavy
    dependencies, torch included, seen through a .pth pointing at this environment's site-packages,
    nothing downloaded) and run the installed `geoseg run` without --config outside the checkout."""
    src, dist = tmp_path / "src", tmp_path / "dist"
    _copy_like_docker(_dockerfile()["wheel_copies"], src)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(dist),
            str(src),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    wheels = list(dist.glob("geoseg-*.whl"))
    assert len(wheels) == 1, wheels
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    models = ("aerial-landuse", "aerial-buildings", "synth-landuse", "synth-buildings", "synth-ships")
    for path in (
        "geoseg/defaults/configs/default.yaml",
        "geoseg/defaults/configs/synthetic.yaml",
        "geoseg/defaults/configs/synthetic-oracle.yaml",
        *(
            f"geoseg/defaults/models/{m}/{f}"
            for m in models
            for f in ("config.json", "geoseg.json", "model.safetensors")
        ),
    ):
        assert path in names, path
    assert not any(n.startswith("geoseg/defaults/models/") and n.split("/")[3] not in models for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheels[0])],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "geoseg_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_", "VIRTUAL_ENV")) and k not in ("PYTHONPATH", "PYTHONHOME")
    }
    env.update(PATH=f"{venv / 'bin'}:/usr/bin:/bin", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")

    def run(*args, timeout=300):
        res = subprocess.run(list(args), cwd=elsewhere, env=env, capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res.stdout

    where = run(str(py), "-c", "import geoseg, geoseg.cli.main as m; print(geoseg.__file__); print(m.DEFAULT_CONFIG)")
    module, default_config = where.split()
    assert Path(module).is_relative_to(venv) and Path(default_config).is_relative_to(venv), where
    assert not Path(default_config).is_symlink()

    run("geoseg", "synth", "scene.tif", "--size", "256", "--seed", "3")
    run("geoseg", "-q", "run", "scene.tif", "--out", "out")
    summary = json.loads((elsewhere / "out" / "scene" / "summary.json").read_text())
    assert summary["status"] == "ok"
    # The packaged default: the aerial models (a synthetic scene is not what they know; no truth here).
    assert set(summary["models"]) == {"landuse", "buildings"}
    assert sum(c["pixels"] for c in summary["models"]["landuse"]["classes"].values()) == summary["valid_pixels"] > 0
