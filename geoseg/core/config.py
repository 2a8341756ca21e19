"""Typed run configuration, loaded from YAML and validated before any pixel is read.

Every model is one *head* of the run: all heads see the same tile read, in the same actor.
Units are in the names where they are not pixels: ``tile_size`` and ``halo`` are pixels,
``min_area_m2`` square metres, ``simplify_m`` metres.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from geoseg.core.errors import ConfigError
from geoseg.core.heads import Frozen as _Frozen
from geoseg.core.heads import ModelConfig


class TilingConfig(_Frozen):
    """Where tiles are cut and what the models see.

    A tile is the unit of work: its ``tile_size`` core pixels are written, and objects are decoded
    over the core plus ``halo`` pixels each side (which joins them across seams). With
    ``blend: hann`` (the default) every head runs on ``window``-pixel windows laid on one grid over
    the whole scene, neighbours sharing ``overlap`` pixels, and their probabilities are averaged
    with weights that fade over the overlap (``geoseg.raster.windows``): no tile or window edge shows in
    the output, and a tile's result does not depend on the tiling. ``window`` and ``overlap`` are
    in the model's pixels. ``blend: none`` runs each tile as one window of its core plus halo and
    keeps the core (cheaper, with seams for networks that use the whole window's context).
    ``resample``: a raster whose pixel size is off the model's (``input.gsd_m``) by more than 1.25x
    is read resampled to the model's pixels and its outputs written on the raster's own grid;
    ``max_resample`` bounds the factor per axis either way.
    """

    tile_size: int = Field(default=1024, ge=16, le=8192)
    halo: int = Field(default=32, ge=0, le=1024)
    blend: Literal["hann", "none"] = "hann"
    # 1024 sharing 128: the networks run on 1.31x the raster's pixels (512 sharing 128: 1.78x) with
    # the same 128 px crossfade; held-out scores of the aerial models were equal at both.
    window: int = Field(default=1024, ge=32, le=4096)
    overlap: int = Field(default=128, ge=0, le=2048)
    resample: bool = True
    max_resample: float = Field(default=16.0, ge=1.0)

    @field_validator("window")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"window must be a multiple of 32 (encoders downsample by 32), got {value}")
        return value

    @model_validator(mode="after")
    def _overlap_fits(self) -> TilingConfig:
        if 2 * self.overlap > self.window:
            raise ValueError(f"overlap {self.overlap} is more than half the window {self.window}")
        return self


class RuntimeConfig(_Frozen):
    """How the work runs: batch size per model call, device and actor count."""

    batch_size: int = Field(default=8, ge=1, le=1024)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # None: one actor per GPU when GPUs exist; on CPU one actor, leaving a core for reading.
    num_actors: int | None = Field(default=None, ge=1)
    # Batches queued per actor so that transfers overlap compute.
    batches_in_flight_per_actor: int = Field(default=2, ge=1, le=16)
    # Test-time augmentation for every head that does not set its own: 'flip' averages the
    # probabilities of the tile and its horizontal, vertical and double flips (4x the compute).
    tta: Literal["none", "flip"] = "none"
    # Number format of the networks: auto = bf16 on CUDA (fp16 where the GPU lacks bf16) and on CPUs
    # that compute bf16 natively (AVX-512 BF16, AMX), float32 elsewhere. A head may pin fp32.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # Window outputs a model actor keeps for the next tiles (geoseg.models.blend): neighbours share windows.
    window_cache_mb: int = Field(default=256, ge=0)


VECTOR_FORMATS = ("gpkg", "parquet")
SEMANTIC_NODATA = 255  # class value of a semantic mask's pixels without a result (outside the valid input)


class OutputConfig(_Frozen):
    """What a scene writes besides its masks: ``vectors`` lists the polygon formats, ``gpkg`` (one
    GeoPackage: a layer per model, the counts table, QGIS styles) and/or ``parquet`` (one GeoParquet
    file per model). Also given as a comma-separated string, as the ``--vectors`` flag does."""

    vectors: list[str] = ["gpkg"]

    @field_validator("vectors", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    @field_validator("vectors")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        for v in value:
            if v not in VECTOR_FORMATS:
                raise ValueError(f"unknown vector format '{v}' (choose from {', '.join(VECTOR_FORMATS)})")
        if not value:
            raise ValueError(f"at least one vector format ({', '.join(VECTOR_FORMATS)})")
        return list(dict.fromkeys(value))


class StacApiConfig(_Frozen):
    """A saved STAC API search (``stac_api:``, or the flags ``--stac-api URL --collections ...``):
    every Item it finds is an input of the run (``geoseg.raster.stac_search``). It chooses inputs,
    not how they are processed, so it is no part of the settings fingerprint: changing the search
    redoes nothing already done. ``query`` (the query extension) and ``filter`` (CQL2-JSON) are
    mappings, or JSON text as the flags give them."""

    url: str = Field(min_length=1)
    collections: list[str] = Field(min_length=1)
    bbox: list[float] | None = None  # west, south, east, north in WGS84 degrees
    datetime: str | None = None  # an RFC 3339 instant or interval: 2026-01-01T00:00:00Z, 2026-01-01/..
    query: dict[str, Any] | None = None
    filter: dict[str, Any] | None = None
    max_items: int | None = Field(default=None, ge=1)

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"a STAC API's URL is http:// or https://, got '{value}'")
        return value

    @field_validator("collections", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        """``a,b`` or ``[a, b]``; each flag ``--collections`` may name several, comma-separated."""
        values = [value] if isinstance(value, str) else value
        if isinstance(values, (list, tuple)) and all(isinstance(v, str) for v in values):
            return [c.strip() for v in values for c in v.split(",") if c.strip()]
        return value

    @field_validator("query", "filter", mode="before")
    @classmethod
    def _json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"not valid JSON ({exc})") from None
        return value

    @field_validator("bbox")
    @classmethod
    def _bbox(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (len(value) != 4 or value[0] > value[2] or value[1] > value[3]):
            raise ValueError(f"bbox is west, south, east, north with west <= east and south <= north, got {value}")
        return value

    @model_validator(mode="after")
    def _one_filter(self) -> StacApiConfig:
        if self.query is not None and self.filter is not None:
            raise ValueError("give query or filter, not both")
        return self


class Config(_Frozen):
    """A whole run: tiling, runtime and the heads to run on every tile; optionally a STAC API
    search whose Items are inputs too."""

    tiling: TilingConfig = TilingConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    output: OutputConfig = OutputConfig()
    models: dict[str, ModelConfig] = Field(min_length=1)
    stac_api: StacApiConfig | None = None
    # Directory that relative paths in the file (factories, weights) are resolved against.
    base_dir: str = "."

    @model_validator(mode="before")
    @classmethod
    def _contracts(cls, data: Any) -> Any:
        """Fill each head's defaults from the geoseg.json beside its weights (the YAML wins)."""
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            from geoseg.core.contract import merge_contract

            base = str(data.get("base_dir", "."))
            data = {
                **data,
                "models": {
                    k: merge_contract(k, v, base) if isinstance(v, dict) else v for k, v in data["models"].items()
                },
            }
        return data

    @model_validator(mode="after")
    def _names(self) -> Config:
        for name in self.models:
            if not name.replace("_", "").isalnum():
                raise ValueError(f"model name '{name}' must be letters, digits and '_' (it names files and layers)")
        return self

    @property
    def bands_needed(self) -> list[int]:
        """Sorted union of the bands every head reads: one read serves all heads."""
        return sorted({b for m in self.models.values() for b in m.bands})


def _key(loc: tuple[Any, ...]) -> str:
    skip = ("function-", "literal[", "ScaleNormalize", "MeanStd", "ClipNormalize", "DbNormalize")
    tags = ("none", "scale", "meanstd", "clip", "db")  # tags of the normalize union
    return ".".join(str(p) for p in loc if not str(p).startswith(skip) and p not in tags)


def config_from_dict(data: dict[str, Any], source: str = "<config>", base_dir: str = ".") -> Config:
    """Validate a plain dict; errors become one ConfigError naming the source and key."""
    try:
        return Config.model_validate({**data, "base_dir": str(base_dir)})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(source, _key(err["loc"]), err["msg"].removeprefix("Value error, ")) from None


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; errors are one line naming the file (and line)."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(str(path), "", f"not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "", "top level must be a mapping")
    return data


def load_config(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read a YAML config; ``overrides`` (e.g. ``{"tiling": {"halo": 0}}``) win over the file.

    Relative paths in it (factories, weights, torchscript) are resolved against the file's folder.
    """
    path = Path(path)
    data = read_yaml_mapping(path)
    flags: dict[str, str] = {}  # key -> the flag that gave it
    from_flags: dict[str, list[str]] = {}  # sections that only flags gave -> those flags
    for section, values in (overrides or {}).items():
        given = {k: v for k, v in values.items() if v is not None}
        if not given:
            if section in data and data[section] is None:
                data[section] = {}  # an empty section in the file: its defaults
            continue
        if not data.get(section):
            from_flags[section] = [_flag(section, k) for k in given]
        data[section] = {**(data.get(section) or {}), **given}
        flags.update({f"{section}.{k}": _flag(section, k) for k in given})
    try:
        return config_from_dict(data, str(path), str(path.resolve().parent))
    except ConfigError as exc:
        # The bad value came from a command-line flag, not the file: name the flag.
        section, _, rest = exc.key.partition(".")
        key = rest.partition(".")[0]
        if exc.key in flags or f"{section}.{key}" in flags:
            raise ConfigError(flags.get(exc.key) or flags[f"{section}.{key}"], "", exc.problem) from None
        if section in from_flags:
            raise ConfigError(_flag(section, key) if key else ", ".join(from_flags[section]), "", exc.problem) from None
        raise


# Flags named otherwise than their key: --stac-api is stac_api.url.
_FLAG_NAMES = {"stac_api.url": "--stac-api"}


def _flag(section: str, key: str) -> str:
    return _FLAG_NAMES.get(f"{section}.{key}") or "--" + key.replace("_", "-")
