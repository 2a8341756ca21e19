"""A scene's GeoPackage starts as a copy of an empty one: every model's layer, the ``counts`` table
and the layer styles, made once per CRS by each scene writer.

Creating those tables (GeoPackage metadata, R-tree indexes, triggers, styles) cost 35-45 ms a
scene here, more than anything else for a small scene; copying the empty file costs 0.2 ms, and a
scene then only appends its features and counts. SQLite's syncs are off while writing (GDAL's
``OGR_SQLITE_SYNCHRONOUS``): the file is in the scene's staging folder, published by a rename once
complete, so a crash never leaves a half-written GeoPackage where users look.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from geoseg.core.config import Config
from geoseg.outputs.export import INSTANCE_FIELDS, SEMANTIC_FIELDS, LayerWriter, write_counts_table
from geoseg.outputs.styles import write_layer_styles


class GpkgTemplates:
    """Empty GeoPackages of one config, one per CRS, kept as bytes (about 100 KB each): the first
    scene in a CRS creates its own, later ones start from a copy. Nothing is left on disk when the
    writer is killed at the end of a run. Thread-safe: a writer's threads assemble several scenes
    at once. Made, it turns SQLite's syncs off for GDAL in this process (see the module)."""

    def __init__(self, config: Config) -> None:
        os.environ.setdefault("OGR_SQLITE_SYNCHRONOUS", "OFF")
        self.config = config
        self.empty: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def copy_to(self, path: Path, crs_wkt: str) -> None:
        """A new GeoPackage at ``path`` with the config's empty layers in ``crs_wkt``."""
        with self.lock:
            empty = self.empty.get(crs_wkt)
            if empty is None:
                write_empty(path, self.config, crs_wkt)
                self.empty[crs_wkt] = path.read_bytes()
                return
        path.write_bytes(empty)


def write_empty(path: Path, config: Config, crs_wkt: str) -> None:
    """Every model's layer (no feature), the ``counts`` table (no row) and the layer styles."""
    for name, spec in config.models.items():
        LayerWriter(path, name, crs_wkt, SEMANTIC_FIELDS if spec.task == "semantic" else INSTANCE_FIELDS).flush()
    write_counts_table(path, [])
    write_layer_styles(path, config)
