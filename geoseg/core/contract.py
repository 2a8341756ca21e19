"""The input contract stored with a model: ``geoseg.json`` beside its weights.

It says what the network was trained on and how its input is prepared, so that a run can refuse a
raster that does not fit before any pixel is read::

    {
      "geoseg_contract": 1,
      "task": "semantic", "classes": ["water", "forest"], "colors": ["#1e3c8c", "#1e6428"],
      "bands": [1, 2, 3],                        # default band mapping (1-based, in order)
      "input": {"count": 3, "names": ["red", "green", "blue"], "dtype": "uint8", "gsd_m": 1.0},
      "normalize": {"mean": [...], "std": [...]},   # or {"scale": 255}, {"clip_low", "clip_high"}, {"db": true, ...}
      "trained_on": {"imagery": "real", "source": "..."},   # or "synthetic": geoseg synth scenes only
      "threshold": 0.6, "min_area_m2": 1200, "tta": "flip",   # decoding, as its metrics were scored
      "metrics": {...}, "training": {...}, "data": "...", "licence": "..."
    }

Keys a head takes from the contract (``CONTRACT_KEYS``) are defaults: the YAML config wins. Two
overrides switch a check off on purpose: setting ``bands`` (an explicit band mapping) drops the
band-count check, and setting ``normalize`` to something else drops the dtype check (the user now
owns the mapping from pixel values to network input).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from pyproj import CRS, Transformer

from geoseg.core.errors import InputError
from geoseg.core.units import lonlat_tools

CONTRACT_FILE = "geoseg.json"
CONTRACT_VERSION = 1
# Keys of a head (ModelConfig) that a contract may supply.
CONTRACT_KEYS = (
    "task",
    "classes",
    "colors",
    "channels",
    "bands",
    "normalize",
    "input",
    "threshold",
    "seed_threshold",
    "mask_threshold",
    "min_area_m2",
    "simplify_m",
    "tta",
    "trained_on",
    "precision",
)


def resolve(path: str, base_dir: str) -> Path:
    """A config path: absolute as given, else relative to the config's folder."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


def model_files(path: Path) -> list[Path]:
    """The files that define a network: every file of a model folder (sorted), or the file itself."""
    return sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]


def hash_files(paths: list[Path]) -> str:
    """A short hash of the files' names and bytes (raises OSError if one cannot be read)."""
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.name.encode())
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def contract_path(weights: Path) -> Path | None:
    """``DIR/geoseg.json`` for a model directory; ``NAME.geoseg.json`` or ``geoseg.json`` beside a file."""
    candidates = (
        [weights / CONTRACT_FILE]
        if weights.is_dir()
        else [weights.with_name(weights.name.split(".")[0] + "." + CONTRACT_FILE), weights.with_name(CONTRACT_FILE)]
    )
    return next((c for c in candidates if c.is_file()), None)


def load_contract(path: str | Path) -> dict[str, Any]:
    """Read a geoseg.json; raises ValueError naming the file when it is not a contract."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable geoseg.json ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be an object")
    version = data.get("geoseg_contract", CONTRACT_VERSION)
    if version != CONTRACT_VERSION:
        raise ValueError(f"{path}: contract version {version}, this geoseg reads version {CONTRACT_VERSION}")
    return data


def save_contract(directory: str | Path, contract: dict[str, Any]) -> Path:
    """Write ``DIR/geoseg.json`` (keys in a stable order)."""
    path = Path(directory) / CONTRACT_FILE
    path.write_text(json.dumps({"geoseg_contract": CONTRACT_VERSION, **contract}, indent=2) + "\n")
    return path


def merge_contract(name: str, head: dict[str, Any], base_dir: str) -> dict[str, Any]:
    """A head's YAML mapping with its contract's defaults filled in (the YAML wins)."""
    source = head.get("weights") or head.get("torchscript")
    if not isinstance(source, str):
        return head
    weights = resolve(source, base_dir)
    if not weights.exists():
        key = "weights" if head.get("weights") else "torchscript"
        raise ValueError(f"models.{name}.{key}: not found: {weights}")
    path = contract_path(weights)
    if path is None:
        return head
    contract = load_contract(path)
    merged = {k: contract[k] for k in CONTRACT_KEYS if k in contract}
    merged.update(head)
    input_spec = dict(contract.get("input") or {})
    if "bands" in head:
        input_spec.pop("count", None)
    if "normalize" in head and head["normalize"] != contract.get("normalize", "none"):
        input_spec.pop("dtype", None)
    input_spec.update(head.get("input") or {})
    merged["input"] = input_spec
    return merged


def scene_gsd_m(crs_wkt: str, transform: Any, width: int, height: int) -> float:
    """Ground distance of one pixel step (metres, mean of x and y) at the raster's centre."""
    geod, to_lonlat = lonlat_tools(crs_wkt)  # (made once per CRS: per scene, they were most of the driver's time)
    if to_lonlat is None:  # a local CRS: pyproj says it cannot be placed on the earth
        to_lonlat = Transformer.from_crs(CRS.from_user_input(crs_wkt), "EPSG:4326", always_xy=True)
    c, r = width / 2.0, height / 2.0
    t = transform
    cols, rows = [c, c + 1, c], [r, r, r + 1]
    xs = [t.c + t.a * i + t.b * j for i, j in zip(cols, rows)]
    ys = [t.f + t.d * i + t.e * j for i, j in zip(cols, rows)]
    lon, lat = to_lonlat.transform(xs, ys)
    _, _, dx = geod.inv(lon[0], lat[0], lon[1], lat[1])
    _, _, dy = geod.inv(lon[0], lat[0], lon[2], lat[2])
    return float((dx + dy) / 2.0)


def check_scene(info: Any, config: Any) -> None:
    """Check a scene header (``geoseg.raster.read.SceneInfo``) against every head's input contract.

    Raises one InputError naming the file, the model and what does not fit.
    """
    gsd: float | None = None
    for name, spec in config.models.items():
        want = spec.input
        problems: list[str] = []
        if max(spec.bands) > info.count:
            problems.append(f"reads bands {spec.bands} but the raster has {info.count} band(s)")
        elif want.count is not None and want.count != info.count:
            names = f" ({', '.join(want.names)})" if want.names else ""
            problems.append(
                f"was trained on {want.count}-band rasters{names}, this one has {info.count} band(s); "
                f"set models.{name}.bands to map its bands"
            )
        if want.dtype is not None and want.dtype != info.dtype:
            problems.append(
                f"expects {want.dtype} pixels, the raster is {info.dtype}; convert it or set "
                f"models.{name}.normalize for {info.dtype} values"
            )
        if want.gsd_m is not None:
            if gsd is None:
                gsd = scene_gsd_m(info.crs_wkt, info.transform, info.width, info.height)
            problems += _pixel_size_problems(name, want, gsd, config.tiling)
        if problems:
            raise InputError(info.path, f"does not fit model '{name}': " + "; ".join(problems))


def _pixel_size_problems(name: str, want: Any, gsd: float, tiling: Any) -> list[str]:
    """What is wrong with a raster's pixel size for a model trained at ``want.gsd_m``: with
    resampling on, only a factor beyond ``tiling.max_resample`` (per axis); with it off (or
    ``blend: none``, which runs tiles as they are), anything beyond ``want.gsd_tolerance``."""
    ratio = gsd / want.gsd_m
    trained = f"was trained at {want.gsd_m:g} m per pixel, the raster has {gsd:.3g} m"
    if not math.isfinite(ratio) or ratio <= 0:
        return [f"{trained}: no usable pixel size"]
    if tiling.resample and tiling.blend != "none":
        if max(ratio, 1 / ratio) <= tiling.max_resample:
            return []
        pixels = f"{max(ratio, 1 / ratio) ** 2:,.0f}"
        what = (
            f"resampling would make {pixels} model pixels of each of its pixels"
            if ratio > 1
            else f"resampling would average {pixels} of its pixels into each model pixel"
        )
        return [
            f"{trained}: {what} (limit {tiling.max_resample:g}x per axis); resample the raster, or raise "
            f"tiling.max_resample if that is what you want"
        ]
    if ratio > want.gsd_tolerance or ratio < 1 / want.gsd_tolerance:
        how = "turn tiling.resample on" if tiling.blend != "none" else "use tiling.blend: hann, which resamples"
        return [f"{trained} (more than {want.gsd_tolerance:g}x off); resample it, or {how}"]
    return []


def imagery_warning(config: Any, scenes: list[Any]) -> tuple[str, str] | None:
    """Heads trained only on synthetic scenes, run on rasters ``geoseg synth`` did not write.

    Returns ``(the run's one warning, the line for each such scene's summary.json)``, or None when
    no head is synthetic-only or every scene is synthetic (``SceneInfo.synthetic``).
    """
    models = [n for n, s in config.models.items() if s.trained_on is not None and s.trained_on.imagery == "synthetic"]
    real = [Path(s.path).name for s in scenes if not s.synthetic]
    if not models or not real:
        return None
    heads = f"model {models[0]} was" if len(models) == 1 else f"models {', '.join(models)} were"
    trained = f"{heads} trained only on synthetic scenes (geoseg synth)"
    named = ", ".join(real[:3]) + (f" and {len(real) - 3} more" if len(real) > 3 else "")
    inputs = (
        f"1 input is real imagery ({named})" if len(real) == 1 else f"{len(real)} inputs are real imagery ({named})"
    )
    run = (
        f"{trained}; {inputs}: expect wrong classes and counts. Use models trained on imagery like yours "
        "(docs/models.md)."
    )
    scene = f"{trained}, and this raster is not one: expect wrong classes and counts (docs/models.md)"
    return run, scene
