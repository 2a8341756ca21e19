"""One scene's outputs as its tiles arrive: masks, seam stitching, polygons, counts, summary.

A scene writer (``geoseg.runner.writer``) feeds ``SceneJob.add`` with tile results in any order (each
placed by its own window); ``finish`` completes the files in a local staging folder and publishes
them through the run's ``OutputStore`` (a folder rename, or an upload with its manifest last);
``abort`` removes them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from geoseg.core.checkpoint import checkpoint_stamp, load_tile, save_tile
from geoseg.core.checkpoint import drop as drop_checkpoint
from geoseg.core.config import Config
from geoseg.core.storage import OutputStore, write_json
from geoseg.core.units import GroundScale, ground_scale
from geoseg.models.postprocess import TileResult, empty_head
from geoseg.outputs.export import (
    INSTANCE_FIELDS,
    SEMANTIC_FIELDS,
    LayerWriter,
    MaskWriter,
    ObjectSink,
    open_gpkg,
    write_counts_table,
)
from geoseg.outputs.gpkg_template import GpkgTemplates
from geoseg.outputs.quicklook import scene_overlays, write_quicklook
from geoseg.outputs.stac import write_scene_item
from geoseg.outputs.stitch import HeadStitcher
from geoseg.outputs.styles import write_mask_styles
from geoseg.raster.grid import tile_grid_shape
from geoseg.raster.read import SceneInfo

log = logging.getLogger("geoseg")


class SceneJob:
    """Stitches and writes one scene; holds at most a few tiles' worth of pixels."""

    def __init__(
        self,
        index: int,
        info: SceneInfo,
        config: Config,
        store: OutputStore,
        stamp: dict[str, str] | None = None,
        scale: GroundScale | None = None,
        resume_tiles: list[int] | None = None,
        templates: GpkgTemplates | None = None,
    ) -> None:
        # templates: the writer's empty GeoPackages, copied as this scene's (made here when not given).
        # stamp: the config's fingerprint and the run's id, recorded in summary.json (geoseg.outputs.records)
        self.index, self.info, self.config, self.store = index, info, config, store
        self.stamp = stamp or {}
        self.grid_shape = tile_grid_shape(info.width, info.height, config.tiling.tile_size)
        self.n_tiles = self.grid_shape[0] * self.grid_shape[1]
        self.done = 0  # tile results received
        self.valid_pixels = 0
        self.error: str | None = None
        self.started = time.monotonic()
        # The driver passes the scale it computed for the tasks; computed here when run alone.
        self.scale = scale or ground_scale(info.crs_wkt, info.transform, info.width, info.height)
        # Large scenes checkpoint each tile result in their staging folder (geoseg.core.checkpoint), so a
        # killed run's next run replays them instead of recomputing them.
        self.checkpoint = (
            None
            if store.remote
            else checkpoint_stamp(info.path, info.fingerprint, self.stamp.get("config", ""), self.n_tiles)
        )
        self.tmp_dir = store.staging_dir(info.folder, self.checkpoint)
        self.gpkg = self.tmp_dir / f"{info.stem}.gpkg"
        (templates or GpkgTemplates(config)).copy_to(self.gpkg, info.crs_wkt)
        profile = {"width": info.width, "height": info.height, "crs": info.crs_wkt, "transform": info.transform}
        bounds = _bounds(info)
        self.masks: dict[str, MaskWriter] = {}
        self.layers: dict[str, LayerWriter] = {}
        self.sinks: dict[str, ObjectSink] = {}
        self.stitchers: dict[str, HeadStitcher] = {}
        for name, spec in config.models.items():
            self.masks[name] = MaskWriter(self.tmp_dir / f"{info.stem}_{name}.tif", profile, spec, name)
            fields = SEMANTIC_FIELDS if spec.task == "semantic" else INSTANCE_FIELDS
            self.layers[name] = LayerWriter(self.gpkg, name, info.crs_wkt, fields, exists=True)
            self.sinks[name] = ObjectSink(spec, self.layers[name], info.transform, info.crs_wkt, bounds, self.scale)
            self.stitchers[name] = HeadStitcher(self.grid_shape, spec.task == "instance", self.sinks[name])
        self.resumed = 0  # tiles replayed from an earlier run's checkpoints
        if self.checkpoint is not None:
            for tile_index in resume_tiles or []:
                self._place(load_tile(self.tmp_dir, tile_index))
                self.resumed += 1

    def add(self, result: TileResult) -> None:
        """Place one tile's result, then checkpoint it (large scenes)."""
        self._place(result)
        if self.checkpoint is not None and result.status != "error" and not self.error:
            save_tile(self.tmp_dir, result.tile.index, result)

    def _place(self, result: TileResult) -> None:
        """Masks by window, objects into the stitchers."""
        tile = result.tile
        self.done += 1
        if result.status == "error":
            self.error = self.error or result.error or "unknown error"
            return
        if self.error:
            return
        if result.status == "empty":  # all nodata: no model ran; neighbours still learn it arrived
            h, w = int(tile.core.height), int(tile.core.width)
            for name, mask in self.masks.items():
                self.stitchers[name].add(tile.row, tile.col, empty_head(h, w))
                mask.fill(tile.core)
            return
        self.valid_pixels += result.valid_pixels
        for name, head in result.heads.items():
            base = self.stitchers[name].add(tile.row, tile.col, head)
            raster = head.raster
            if self.config.models[name].task == "instance":
                raster = (raster.astype("uint32") + base) * (raster > 0)
            self.masks[name].write(tile.core, raster)

    @property
    def complete(self) -> bool:
        return self.done == self.n_tiles

    def finish(self) -> dict[str, Any]:
        """Merge seam objects, finish the files, publish the folder; returns the summary."""
        models: dict[str, Any] = {}
        counts_rows = []
        # (before the GeoPackage is opened below: a stitcher's last objects may flush a full batch of
        # rows through a connection of their own)
        luts = {name: self.stitchers[name].finish() for name in self.config.models}
        with open_gpkg(self.gpkg) as db:  # every layer's last rows, then the counts: one transaction
            for name in self.config.models:
                self.layers[name].flush(db)
            for name, spec in self.config.models.items():
                sink = self.sinks[name]
                for k, cls in enumerate(spec.classes):
                    counts_rows.append(
                        {
                            "model": name,
                            "task": spec.task,
                            "class": cls,
                            "count": int(sink.count[k]) if spec.task == "instance" else None,
                            "pixels": int(sink.pixels[k]),
                            "area_m2": round(float(sink.area[k]), 3),
                        }
                    )
            write_counts_table(self.gpkg, counts_rows, append=True, db=db)
        for name, spec in self.config.models.items():
            self.masks[name].finish(luts[name] if spec.task == "instance" else None)
            classes = {}
            for row in (r for r in counts_rows if r["model"] == name):
                entry: dict[str, Any] = {"pixels": row["pixels"], "area_m2": row["area_m2"]}
                if spec.task == "instance":
                    entry["count"] = row["count"]
                classes[row["class"]] = entry
            models[name] = {"task": spec.task, "classes": classes}
        quicklook = self._quicklook()
        summary = {
            "input": self.info.path,
            "crs": self.info.crs_string,
            "width": self.info.width,
            "height": self.info.height,
            "status": "ok",
            "output": self.info.folder,
            "fingerprint": self.info.fingerprint,  # the input's size and mtime (or ETag) when it was read
            "config": self.stamp.get("config", ""),
            "run": self.stamp.get("run", ""),
            "device": self.stamp.get("device", ""),  # where the models ran and their precision: "cpu bf16"
            "tiles": self.n_tiles,
            "tiles_resumed": self.resumed,  # taken from an earlier run's checkpoints, not recomputed
            "valid_pixels": self.valid_pixels,
            "seconds": round(time.monotonic() - self.started, 2),
            "published_unix": round(time.time(), 3),
            "warnings": list(self.info.warnings),  # e.g. models trained on other imagery (geoseg.core.contract)
            "models": models,
            **cloud_cover(models, self.valid_pixels),
            **quicklook,
        }
        write_mask_styles(
            self.config,
            {name: mask.path for name, mask in self.masks.items()},
            {name: int(sink.count.sum()) for name, sink in self.sinks.items()},
        )
        if "parquet" in self.config.output.vectors:
            from geoseg.outputs.geoparquet import write_vector_formats  # pyarrow: only in writers that need it

            write_vector_formats(self.gpkg, self.config.models, self.config.output.vectors)
        drop_checkpoint(self.tmp_dir)
        write_json(self.tmp_dir / "summary.json", summary)
        # Last before publishing: the STAC Item lists the files of known kinds in the folder now.
        write_scene_item(
            self.tmp_dir,
            self.info,
            self.config,
            self.store,
            self.stamp,
            cloud_cover=summary.get("cloud_cover"),
            shadow_cover=summary.get("cloud_shadow_cover"),
        )
        self.store.publish(self.tmp_dir, self.info.folder)
        return summary

    def _quicklook(self) -> dict[str, Any]:
        """``<stem>_quicklook.png``: the masks over the image, from overviews (geoseg.outputs.quicklook).
        Its failure (the input gone since it was read) does not fail the scene; the summary says why."""
        name = f"{self.info.stem}_quicklook.png"
        bands = next(iter(self.config.models.values())).bands
        overlays = scene_overlays(
            self.config,
            {model: mask.path for model, mask in self.masks.items()},
            {model: mask.values for model, mask in self.masks.items() if mask.values is not None},
        )
        try:
            write_quicklook(self.tmp_dir / name, self.info.raster, overlays, bands)
        except Exception as exc:  # noqa: BLE001 (any reason: reported, never fatal)
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            log.warning("%s: no quicklook (%s)", self.info.path, reason)
            return {"quicklook": None, "quicklook_error": reason}
        return {"quicklook": name}

    def abort(self) -> None:
        """Drop everything this scene wrote."""
        for mask in self.masks.values():
            mask.abort()
        self.store.discard(self.tmp_dir)


def _bounds(info: SceneInfo) -> tuple[float, float, float, float]:
    t = info.transform
    xs = (t.c, t.c + t.a * info.width)
    ys = (t.f, t.f + t.e * info.height)
    return min(xs), min(ys), max(xs), max(ys)


CLOUD_CLASSES = ("cloud", "clouds")
SHADOW_CLASSES = ("cloud_shadow", "shadow", "cloud_shadows")


def cloud_cover(models: dict[str, Any], valid_pixels: int) -> dict[str, Any]:
    """Cloud and cloud-shadow cover in % of the valid pixels, from the first semantic model with a
    class named cloud: ``{"cloud_cover", "cloud_shadow_cover" (None without a shadow class),
    "cloud_model"}``; empty when no model has such a class."""
    for name, m in models.items():
        classes = m["classes"] if m["task"] == "semantic" else {}
        cloud = next((c for c in CLOUD_CLASSES if c in classes), None)
        if cloud is None:
            continue
        shadow = next((c for c in SHADOW_CLASSES if c in classes), None)

        def pct(cls: str, classes: dict[str, Any] = classes) -> float:
            return round(100.0 * classes[cls]["pixels"] / valid_pixels, 3) if valid_pixels else 0.0

        return {"cloud_cover": pct(cloud), "cloud_shadow_cover": pct(shadow) if shadow else None, "cloud_model": name}
    return {}
