"""Typed run configuration, loaded from YAML and validated before any pixel is read.

Every model is one *head* of the run: all heads see the same tile read, in the same actor.
Units are in the names where they are not pixels: ``tile_size`` and ``halo`` are pixels,
``min_area_m2`` square metres, ``simplify_m`` metres.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from geoseg.errors import ConfigError

InstanceChannel = Literal["body", "border", "contact"]


class _Frozen(BaseModel):
    # frozen: safe to ship to actors; forbid: a typo in a key fails instead of being ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class TilingConfig(_Frozen):
    """Where tiles are cut: ``tile_size`` core pixels are written per tile, ``halo`` pixels of context each side."""

    tile_size: int = Field(512, ge=16, le=8192)
    halo: int = Field(64, ge=0, le=1024)


class RuntimeConfig(_Frozen):
    """How the work runs: batch size per model call, device and actor count."""

    batch_size: int = Field(8, ge=1, le=1024)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # None: one actor per GPU when GPUs exist; on CPU one actor, leaving a core for reading.
    num_actors: int | None = Field(None, ge=1)
    # Batches queued per actor so that transfers overlap compute.
    batches_in_flight_per_actor: int = Field(2, ge=1, le=16)


class ScaleNormalize(_Frozen):
    """Divide raw values by ``scale`` (255 for 8-bit imagery)."""

    scale: float = Field(gt=0)


class MeanStdNormalize(_Frozen):
    """Per-band ``(x - mean) / std`` with statistics of the training data, never of the tile."""

    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _same_length(self) -> "MeanStdNormalize":
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError("every std must be > 0")
        return self


Normalize = Union[Literal["none"], ScaleNormalize, MeanStdNormalize]


class ModelConfig(_Frozen):
    """One head: a semantic (class per pixel) or instance (objects of one class) model."""

    task: Literal["semantic", "instance"]
    classes: list[str] = Field(min_length=1)
    # Optional '#rrggbb' per class, for the GeoTIFF colour table and QGIS.
    colors: list[str] | None = None
    bands: list[int] = Field(min_length=1, description="1-based band indexes fed to the model, in order")
    normalize: Normalize = "none"
    # Where the network comes from: 'file.py:callable' or 'package.module:callable'.
    factory: str | None = None
    # Instance decoding (ignored for semantic heads).
    channels: list[InstanceChannel] = ["body"]
    threshold: float = Field(0.5, gt=0, lt=1, description="body > threshold is foreground (one channel)")
    seed_threshold: float = Field(0.7, gt=0, lt=1, description="body*(1-contact) > this seeds the watershed")
    mask_threshold: float = Field(0.4, gt=0, lt=1, description="watershed grows over body > this")
    min_area_m2: float = Field(0.0, ge=0)
    simplify_m: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        if any(b < 1 for b in self.bands):
            raise ValueError(f"bands are 1-based indexes, got {self.bands}")
        if self.task == "semantic" and len(self.classes) > 254:
            raise ValueError("at most 254 classes: 255 is the nodata value of the mask")
        if self.task == "instance":
            if len(self.classes) != 1:
                raise ValueError(f"an instance model has exactly one class, got {self.classes}")
            if self.channels not in (["body"], ["body", "border", "contact"]):
                raise ValueError(f"channels must be [body] or [body, border, contact], got {self.channels}")
        if self.colors is not None and len(self.colors) != len(self.classes):
            raise ValueError(f"{len(self.colors)} colors for {len(self.classes)} classes")
        if isinstance(self.normalize, MeanStdNormalize) and len(self.normalize.mean) != len(self.bands):
            raise ValueError(f"normalize has {len(self.normalize.mean)} means for {len(self.bands)} bands")
        if self.factory is None:
            raise ValueError("no model source: set 'factory: file.py:callable'")
        return self

    @property
    def out_channels(self) -> int:
        """Channels the network must return: one per class, or one per instance channel."""
        return len(self.classes) if self.task == "semantic" else len(self.channels)


class Config(_Frozen):
    """A whole run: tiling, runtime and the heads to run on every tile."""

    tiling: TilingConfig = TilingConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    models: dict[str, ModelConfig] = Field(min_length=1)
    # Directory that relative paths in the file (factories, weights) are resolved against.
    base_dir: str = "."

    @model_validator(mode="after")
    def _names(self) -> "Config":
        for name in self.models:
            if not name.replace("_", "").isalnum():
                raise ValueError(f"model name '{name}' must be letters, digits and '_' (it names files and layers)")
        return self

    @property
    def bands_needed(self) -> list[int]:
        """Sorted union of the bands every head reads: one read serves all heads."""
        return sorted({b for m in self.models.values() for b in m.bands})


def _key(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith(("function-", "literal[", "ScaleNormalize", "MeanStd")))


def config_from_dict(data: dict[str, Any], source: str = "<config>", base_dir: str = ".") -> Config:
    """Validate a plain dict; errors become one ConfigError naming the source and key."""
    try:
        return Config.model_validate({**data, "base_dir": str(base_dir)})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(source, _key(err["loc"]), err["msg"].removeprefix("Value error, ")) from None


def load_config(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read a YAML config; ``overrides`` (e.g. ``{"tiling": {"halo": 0}}``) win over the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), "", f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "", "top level must be a mapping")
    for section, values in (overrides or {}).items():
        data[section] = {**(data.get(section) or {}), **{k: v for k, v in values.items() if v is not None}}
    return config_from_dict(data, str(path), str(path.resolve().parent))
