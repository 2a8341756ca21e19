"""``geoseg.open_run``: a run's outputs in Python (notebooks): layers, counts, mask paths, failures.

    out = geoseg.open_run("out/")
    out.scenes                       # ['scene_a', 'b/scene_b']: output folders, as in --out
    out.counts                       # DataFrame: scene, input, model, task, class, count, pixels, area_m2
    out.layer("scene_a", "ships")    # GeoDataFrame of the GeoPackage layer
    out.masks("scene_a")             # {'landuse': Path('out/scene_a/scene_a_landuse.tif'), ...}
    out.failures                     # [(input, one-line error)]

It reads what the run left in a local output folder: ``run-manifest.json`` (every input ever
processed there; failed ones are failures, not scenes) and each scene's ``summary.json``,
``<stem>.gpkg`` and ``<stem>_<model>.tif``. A folder without a manifest (a run killed before its
end) is read from the ``summary.json`` files found in it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoseg.outputs.records import RUN_MANIFEST

if TYPE_CHECKING:
    import geopandas
    import pandas

COUNT_COLUMNS = ["scene", "input", "model", "task", "class", "count", "pixels", "area_m2"]


class RunOutputs:
    """The published outputs of an output folder (see the module docstring)."""

    def __init__(self, out_dir: str | Path) -> None:
        if str(out_dir).startswith(("s3://", "/vsis3/")):
            raise ValueError(f"{out_dir}: open_run reads a local output folder; download it first")
        self.out_dir = Path(out_dir)
        if not self.out_dir.is_dir():
            raise FileNotFoundError(f"{self.out_dir}: no such output folder")
        self.failures: list[tuple[str, str]] = []  # (input, one-line error), from the run manifest
        self._summaries: dict[str, dict[str, Any]] = {}  # output folder -> its summary.json
        manifest = _read_json(self.out_dir / RUN_MANIFEST) or {}
        entries = manifest.get("inputs") or {}
        for path, entry in entries.items():
            if entry.get("status") == "ok" and entry.get("output"):
                summary = _read_json(self.out_dir / entry["output"] / "summary.json")
                if summary is not None:
                    self._summaries[entry["output"]] = summary
            elif entry.get("status") == "failed":
                self.failures.append((path, str(entry.get("error") or "")))
        if not entries:
            for file in sorted(self.out_dir.rglob("summary.json")):
                summary = _read_json(file)
                if summary is not None and summary.get("status") == "ok":
                    self._summaries[summary.get("output") or file.parent.relative_to(self.out_dir).as_posix()] = summary
        self._summaries = dict(sorted(self._summaries.items()))

    def __repr__(self) -> str:
        return f"RunOutputs({str(self.out_dir)!r}: {len(self.scenes)} scene(s), {len(self.failures)} failed)"

    @property
    def scenes(self) -> list[str]:
        """The scenes with outputs: their folders relative to the output folder."""
        return list(self._summaries)

    def summary(self, scene: str) -> dict[str, Any]:
        """The scene's ``summary.json``; ``scene`` is its folder name or its input path."""
        return self._summaries[self._scene(scene)]

    def folder(self, scene: str) -> Path:
        return self.out_dir / self._scene(scene)

    def models(self, scene: str) -> list[str]:
        return list(self.summary(scene)["models"])

    def masks(self, scene: str) -> dict[str, Path]:
        """``{model: path of the mask GeoTIFF}`` (class per pixel, or object id per pixel)."""
        name = self._scene(scene)
        stem = name.rsplit("/", 1)[-1]
        return {model: self.out_dir / name / f"{stem}_{model}.tif" for model in self.models(name)}

    def gpkg(self, scene: str) -> Path:
        """The scene's GeoPackage: a polygon layer per model and a ``counts`` table."""
        name = self._scene(scene)
        return self.out_dir / name / f"{name.rsplit('/', 1)[-1]}.gpkg"

    def layer(self, scene: str, model: str) -> geopandas.GeoDataFrame:
        """One model's polygons (semantic: ``class``, ``area_m2``; instance: ``instance_id``, ``score``, ...)."""
        import geopandas

        if model not in self.models(scene):
            raise KeyError(f"no model '{model}' in {self._scene(scene)} (models: {', '.join(self.models(scene))})")
        gpkg = self.gpkg(scene)
        parquet = gpkg.with_name(f"{gpkg.stem}_{model}.parquet")
        if not gpkg.exists() and parquet.exists():  # a run with --vectors parquet only
            return geopandas.read_parquet(parquet)
        return geopandas.read_file(gpkg, layer=model)

    def layers(self, scene: str) -> dict[str, geopandas.GeoDataFrame]:
        """``{model: GeoDataFrame}`` for every model of the scene."""
        return {model: self.layer(scene, model) for model in self.models(scene)}

    @property
    def counts(self) -> pandas.DataFrame:
        """Every scene x model x class: ``count`` (instance models; missing for semantic ones),
        ``pixels`` and ``area_m2``, as in each ``summary.json``."""
        import pandas

        rows = [
            {
                "scene": name,
                "input": s["input"],
                "model": model,
                "task": m["task"],
                "class": cls,
                "count": v.get("count"),
                "pixels": v["pixels"],
                "area_m2": v["area_m2"],
            }
            for name, s in self._summaries.items()
            for model, m in s["models"].items()
            for cls, v in m["classes"].items()
        ]
        frame = pandas.DataFrame(rows, columns=COUNT_COLUMNS)
        return frame.astype({"count": "Int64", "pixels": "int64", "area_m2": "float64"})

    def _scene(self, scene: str) -> str:
        key = str(scene)
        if key in self._summaries:
            return key
        for name, summary in self._summaries.items():
            if key == summary.get("input") or _same_file(key, summary.get("input")):
                return name
        raise KeyError(f"no scene '{scene}' in {self.out_dir} (scenes: {', '.join(self.scenes) or 'none'})")


def open_run(out_dir: str | Path) -> RunOutputs:
    """The outputs of the runs into ``out_dir`` (a local folder)."""
    return RunOutputs(out_dir)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _same_file(a: str, b: Any) -> bool:
    if not isinstance(b, str) or "://" in a or "://" in b:
        return False
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False
