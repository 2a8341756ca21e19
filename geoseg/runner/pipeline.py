"""The driver: plans tiles and schedules the work; no pixel, polygon or output file passes through it.

For each batch of tiles of one scene: a read task -> a model actor call -> a post-processing task
-> the scene's writer (``geoseg.runner.writer``, an actor placed anywhere in the cluster). The driver
hands each stage the previous stage's object ref, so arrays go from worker to worker; what it
receives back is one small acknowledgement per tile and one summary per scene. It bounds the tiles
in flight (so memory does not grow with the raster), keeps every model actor fed, and turns any
failure into that scene's one-line error while the other scenes go on. Deaths are survived: a
model actor that dies is replaced and its batches sent again, a scene whose writer dies is redone
on another, and a tile that kills its model actor again and again fails only its scene
(``Scheduler``).

Why Ray core rather than Ray Data: scenes in one run differ in band count and dtype, a bad file
must fail only its own scene, and every head runs on one tile read in one actor call.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import rasterio
import ray

from geoseg.core.config import Config
from geoseg.core.contract import check_scene, imagery_warning
from geoseg.core.errors import GeosegError, InputError
from geoseg.core.s3 import storage_env
from geoseg.core.storage import OutputStore
from geoseg.outputs.quicklook import legend
from geoseg.outputs.records import (
    config_fingerprint,
    entry_from_summary,
    input_key,
    is_current,
    load_manifest,
    model_versions,
    new_run_id,
    read_json,
    save_manifest,
    write_run_record,
)
from geoseg.outputs.report import write_report
from geoseg.outputs.stac_collection import write_collection
from geoseg.raster.discover import FoundInput, clashes, find_inputs, input_fingerprint
from geoseg.raster.read import SceneInfo, inspect_scene, stac_scene
from geoseg.raster.stac_input import is_stac
from geoseg.raster.stac_search import search_inputs
from geoseg.runner.actors import start_model_actors, start_writers, task_cpus, wait_ready
from geoseg.runner.local_ray import LOCAL_OBJECT_STORE_BYTES, ensure_ray, ray_for_run  # noqa: F401 (re-exported)
from geoseg.runner.lock import RunLock
from geoseg.runner.run_report import RunReport, run_csv
from geoseg.runner.scheduler import Scheduler
from geoseg.runner.workers import warm_up_worker

log = logging.getLogger("geoseg")
DRIVER_GDAL_CACHE_MB = 64  # the driver only opens headers


def _plan_inputs(
    inputs: list[str],
    store: OutputStore,
    report: RunReport,
    force: bool,
    recursive: bool,
    manifest: dict[str, dict[str, Any]],
) -> list[tuple[FoundInput, dict[str, Any] | None]]:
    """Find the inputs and keep those to process: new, changed, failed before, or made with another
    config or other models (all of them with ``force``); each with its fingerprint. Reads no pixel."""
    found, errors = find_inputs(inputs, recursive, exclude=None if store.remote else store.location)
    for err in errors:
        report.failures.append((err.path, str(err)))
    todo: list[tuple[FoundInput, dict[str, Any] | None]] = []
    taken: dict[str, str] = {}  # output folder -> input, in this run
    # Folders recorded for other inputs in earlier runs: a new input may not nest in or around them.
    recorded: dict[str, str] = {
        e["output"]: key for key, e in manifest.items() if e.get("status") == "ok" and e.get("output")
    }
    for item in found:
        path, name, key = item.path, item.name, input_key(item.path)
        try:
            clash = next((other for folder, other in taken.items() if clashes(folder, name)), None) or next(
                (
                    other
                    for folder, other in recorded.items()
                    if other != key and folder != name and clashes(folder, name)
                ),
                None,
            )
            if clash is not None:
                raise InputError(
                    path,
                    f"its output folder {store.uri(name)} clashes with that of {clash}; rename one "
                    "of them or give them separate --out folders",
                )
            published = read_json(store, f"{name}/summary.json")
            if published is not None and input_key(str(published.get("input"))) != key:
                raise InputError(
                    path,
                    f"{store.uri(name)} holds the outputs of {published.get('input')}; rename one "
                    "of them or give them separate --out folders",
                )
            taken[name] = path
            fingerprint = input_fingerprint(path)
            if not force and is_current(published, path, fingerprint, report.config_id):
                assert published is not None  # is_current is False without a summary
                log.info("%s: unchanged since run %s, skipped", path, published.get("run"))
                report.summaries.append(published)
                report.skipped += 1
                continue
            todo.append((item, fingerprint))
        except GeosegError as exc:
            log.info("%s", exc)
            report.failures.append((path, str(exc)))
    return todo


def _inspect_inputs(
    todo: list[tuple[FoundInput, dict[str, Any] | None]], config: Config, report: RunReport
) -> list[SceneInfo]:
    """Open each input's header and check it against every head's input contract."""
    scenes: list[SceneInfo] = []
    with rasterio.Env(GDAL_CACHEMAX=DRIVER_GDAL_CACHE_MB):
        for item, fingerprint in todo:
            try:
                info = replace(
                    stac_scene(item.path, item.name, config)
                    if is_stac(item.path)
                    else inspect_scene(item.path, item.name),
                    fingerprint=fingerprint,
                )
                check_scene(info, config)  # band count, dtype, resolution
                scenes.append(info)
            except GeosegError as exc:
                log.info("%s", exc)
                report.failures.append((item.path, str(exc)))
    warning = imagery_warning(config, scenes)  # models trained on synthetic scenes only, on real imagery
    if warning is not None:
        log.warning("%s", warning[0])
        report.warnings.append(warning[0])
        scenes = [s if s.synthetic else replace(s, warnings=(*s.warnings, warning[1])) for s in scenes]
    return scenes


def run(
    inputs: list[str],
    out_dir: str | Path,
    config: Config,
    address: str | None = None,
    progress: bool = True,
    force: bool = False,
    recursive: bool = False,
) -> RunReport:
    """Process every input into ``out_dir`` (a folder, or ``s3://bucket/prefix``); a failing input
    is reported and the others go on.

    Incremental: an input whose published ``summary.json`` shows it done from the same bytes with
    the same config and models is skipped and its outputs are not touched; ``force`` redoes all.
    The run leaves ``summary.csv`` (this run's inputs), ``run-manifest.json`` (every input ever
    processed here), ``runs/<run id>.json`` (this run's record) and ``collection.json`` (a STAC
    Collection of every scene's Item, ``geoseg.outputs.stac``) in ``out_dir``, and ``report.html``, the page
    a person opens (``geoseg.outputs.report``).

    With a STAC API search in the config (``stac_api``), every Item it finds is an input too. The
    search comes first: an API that is down or answers an error raises ``SourceError`` before
    anything is written.
    """
    started = time.monotonic()
    if config.stac_api is not None:
        inputs = [*inputs, *search_inputs(config.stac_api)]
    versions = model_versions(config)  # reads every model's weights: once per run
    report = RunReport(started_unix=time.time(), run_id=new_run_id(), config_id=config_fingerprint(config, versions))
    report.legend = legend(config)
    store = OutputStore(out_dir)
    store.check_writable()
    with contextlib.nullcontext() if store.remote else RunLock(out_dir):  # one run per output folder
        for name in store.remove_leftovers():
            log.info("removed %s, left by a run that was killed", store.uri(name))
        manifest = load_manifest(store)
        try:
            _run_locked(inputs, store, config, address, progress, force, recursive, manifest, report)
        finally:
            report.seconds = time.monotonic() - started
            _record(store, versions, manifest, report)
    return report


def _record(
    store: OutputStore, versions: dict[str, str], manifest: dict[str, dict[str, Any]], report: RunReport
) -> None:
    """The run's files: summary.csv, the run manifest with this run's inputs updated, the STAC
    Collection, its record."""
    for summary in report.summaries:
        manifest[input_key(summary["input"])] = {**entry_from_summary(summary), "models": versions}
    for path, error in report.failures:
        previous = manifest.get(input_key(path), {})
        manifest[input_key(path)] = {
            **previous,
            "status": "failed",
            "error": error,
            "run": report.run_id,
            "config": report.config_id,
            "models": versions,
        }
    store.write_text("summary.csv", run_csv(report))
    save_manifest(store, manifest, versions)
    write_collection(store, manifest)  # collection.json: the STAC Items of every scene published in out/
    write_run_record(
        store,
        report.run_id,
        {
            "run": report.run_id,
            "started_unix": round(report.started_unix, 3),
            "seconds": round(report.seconds, 2),
            "config": report.config_id,
            "models": versions,
            "device": report.device,
            "inputs": {"processed": report.processed, "skipped": report.skipped, "failed": len(report.failures)},
            "tiles": report.tiles,
            "megapixels": round(report.megapixels, 3),
            "failures": [{"input": p, "error": e} for p, e in report.failures],
            "warnings": report.warnings,
            "processed": [s["input"] for s in report.summaries if s.get("run") == report.run_id],
        },
    )
    report.report_path = write_report(store, report, manifest)  # report.html: the page a person opens


def _run_locked(
    inputs: list[str],
    store: OutputStore,
    config: Config,
    address: str | None,
    progress: bool,
    force: bool,
    recursive: bool,
    manifest: dict[str, dict[str, Any]],
    report: RunReport,
) -> None:
    todo = _plan_inputs(inputs, store, report, force, recursive, manifest)
    if not todo:  # nothing new: no cluster, no model
        return
    with ray_for_run(address):
        _process(todo, store, config, progress, report)


def _process(
    todo: list[tuple[FoundInput, dict[str, Any] | None]],
    store: OutputStore,
    config: Config,
    progress: bool,
    report: RunReport,
) -> None:
    env = storage_env()
    # What the first tile waits for starts now, side by side: the model actors build and check
    # their models and a task worker imports the reading and post-processing libraries, while the
    # driver reads the inputs' headers. The writers start once the models are ready: they are
    # needed only when the first tile is done, and their imports (about a second of CPU) would
    # otherwise take a core from the model actor's torch import (on 2 cores, `geoseg -q run` on a
    # 1024^2 image: median 7.29 s against 7.63 s, six runs each, alternated).
    actors = start_model_actors(config)
    writers: list[Any] = []
    ray.remote(num_cpus=task_cpus())(warm_up_worker).remote()
    try:
        scenes = _inspect_inputs(todo, config, report)
        report.device = wait_ready(actors)
        writers = start_writers(config, store, env)
        if scenes:
            Scheduler(scenes, config, env, actors, writers, report, progress, store).run()
    finally:
        for actor in actors + writers:
            ray.kill(actor)
