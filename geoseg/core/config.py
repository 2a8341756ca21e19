"""Typed run configuration, loaded from YAML and validated before any pixel is read.

Every model is one *head* of the run: all heads see the same tile read, in the same actor.
Units are in the names where they are not pixels: ``tile_size`` and ``halo`` are pixels,
``min_area_m2`` square metres, ``simplify_m`` metres.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from geoseg.core.errors import ConfigError

InstanceChannel = Literal["body", "border", "contact"]


# Built-in factory modules that moved into subpackages: configs written for geoseg 0.1 name the old paths.
MOVED_FACTORY_MODULES = {"geoseg.csmask": "geoseg.models.csmask", "geoseg.synth": "geoseg.train.synth"}


class _Frozen(BaseModel):
    # frozen: safe to ship to actors; forbid: a typo in a key fails instead of being ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    window: int = Field(default=512, ge=32, le=4096)
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


class ScaleNormalize(_Frozen):
    """Divide raw values by ``scale`` (255 for 8-bit imagery)."""

    scale: float = Field(gt=0)


class MeanStdNormalize(_Frozen):
    """Per-band ``(x * scale + offset - mean) / std`` with statistics of the training data, never of
    the tile. ``scale`` and ``offset`` turn raw values into physical ones first, as STAC's
    ``raster:bands`` (e.g. Sentinel-2 L2A: reflectance = DN * 0.0001 - 0.1 from processing baseline
    04.00 on); mean and std are then in those units."""

    mean: list[float]
    std: list[float]
    scale: float = 1.0
    offset: float = 0.0

    @model_validator(mode="after")
    def _same_length(self) -> MeanStdNormalize:
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError("every std must be > 0")
        return self


class ClipNormalize(_Frozen):
    """Clip each band to fixed ``[low, high]`` then map to ``[0, 1]`` (uint16 optical imagery).

    ``low``/``high`` are percentiles (``percentiles``, e.g. 2 and 98) of the *training* data,
    stored as values: every tile of every raster is scaled the same way, never by its own statistics.
    """

    clip_low: list[float]
    clip_high: list[float]
    percentiles: tuple[float, float] | None = None  # what the values were computed from (documentation)

    @model_validator(mode="after")
    def _ordered(self) -> ClipNormalize:
        if len(self.clip_low) != len(self.clip_high):
            raise ValueError(f"clip_low has {len(self.clip_low)} values but clip_high has {len(self.clip_high)}")
        if any(h <= lo for lo, h in zip(self.clip_low, self.clip_high)):
            raise ValueError("every clip_high must be > its clip_low")
        return self


class DbNormalize(_Frozen):
    """SAR backscatter: ``10 * log10(max(x, floor))`` then per-band ``(db - mean) / std`` (mean/std in dB)."""

    db: Literal[True]
    mean: list[float]
    std: list[float]
    floor: float = Field(default=1e-6, gt=0)

    @model_validator(mode="after")
    def _same_length(self) -> DbNormalize:
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError("every std must be > 0")
        return self


def _normalize_kind(value: Any) -> str | None:
    """Which normalisation a YAML value is, from its keys (so errors speak of the right one)."""
    if isinstance(value, str):
        return "none"
    if isinstance(value, BaseModel):
        return {ScaleNormalize: "scale", MeanStdNormalize: "meanstd", ClipNormalize: "clip", DbNormalize: "db"}.get(
            type(value)
        )
    if isinstance(value, dict):
        if "db" in value:
            return "db"
        if "clip_low" in value or "clip_high" in value:
            return "clip"
        if "scale" in value and "mean" not in value:
            return "scale"
        return "meanstd"
    return None


Normalize = Annotated[
    Union[
        Annotated[Literal["none"], Tag("none")],
        Annotated[ScaleNormalize, Tag("scale")],
        Annotated[MeanStdNormalize, Tag("meanstd")],
        Annotated[ClipNormalize, Tag("clip")],
        Annotated[DbNormalize, Tag("db")],
    ],
    Discriminator(_normalize_kind),
]


def normalize_values(norm: Normalize) -> int | None:
    """Number of per-band values a normalisation carries (None: applies to any band count)."""
    if isinstance(norm, (MeanStdNormalize, DbNormalize)):
        return len(norm.mean)
    if isinstance(norm, ClipNormalize):
        return len(norm.clip_low)
    return None


class InputSpec(_Frozen):
    """What rasters a model was trained on (the input contract); checked against every scene header.

    ``None`` means "not checked". ``count`` is the band count of the training rasters: a scene with
    another count fails unless the config sets ``bands`` itself (an explicit band mapping).
    """

    count: int | None = Field(default=None, ge=1)
    names: list[str] | None = None  # names of the bands the model reads, in order (e.g. [red, green, blue])
    dtype: str | None = None  # pixel type the normalisation expects, e.g. uint8, uint16, float32
    gsd_m: float | None = Field(default=None, gt=0)  # ground sample distance of the training data, metres
    gsd_tolerance: float = Field(default=3.0, gt=1)  # a scene fails when its GSD differs by more than this factor


class TrainedOn(_Frozen):
    """What imagery a model learned from (its contract's ``trained_on``), so that a run can say when
    a scene is unlike it: ``synthetic`` models (trained only on ``geoseg synth`` scenes) warn on
    every raster that geoseg synth did not write."""

    imagery: Literal["synthetic", "real"]
    source: str = ""  # the data set, in a few words


class ModelConfig(_Frozen):
    """One head: a semantic (class per pixel) or instance (objects of one class) model."""

    task: Literal["semantic", "instance"]
    classes: list[str] = Field(min_length=1)
    # Optional '#rrggbb' per class, for the GeoTIFF colour table and QGIS.
    colors: list[str] | None = None
    bands: list[int] = Field(min_length=1, description="1-based band indexes fed to the model, in order")
    normalize: Normalize = "none"
    # Where the network comes from: exactly one of
    #  - factory: 'file.py:callable' or 'package.module:callable';
    #  - weights (+ arch, encoder): a segmentation-models-pytorch 'save_pretrained' directory
    #    (config.json + model.safetensors: arch and encoder come from config.json), or a
    #    .safetensors / .pt state dict of smp.create_model(arch, encoder, in_channels, classes);
    #  - torchscript: a file written by torch.jit.save.
    # A geoseg.json beside the weights supplies task, classes, bands, normalize and input defaults.
    factory: str | None = None
    arch: str | None = None
    encoder: str | None = None
    arch_params: dict[str, Any] = {}  # extra smp.create_model arguments, e.g. {decoder_channels: [64, 32, 16]}
    weights: str | None = None
    torchscript: str | None = None
    input: InputSpec = InputSpec()
    trained_on: TrainedOn | None = None  # None: not known (no contract says)
    tta: Literal["none", "flip"] | None = None  # None: runtime.tta
    precision: Literal["fp32"] | None = None  # fp32: this network always runs in float32 (runtime.precision aside)
    # Instance decoding (ignored for semantic heads).
    channels: list[InstanceChannel] = ["body"]
    threshold: float = Field(default=0.5, gt=0, lt=1, description="body > threshold is foreground (one channel)")
    seed_threshold: float = Field(default=0.7, gt=0, lt=1, description="body*(1-contact) > this seeds the watershed")
    mask_threshold: float = Field(default=0.4, gt=0, lt=1, description="watershed grows over body > this")
    min_area_m2: float = Field(default=0.0, ge=0)
    simplify_m: float = Field(default=0.0, ge=0)

    @field_validator("factory")
    @classmethod
    def _moved_factory(cls, value: str | None) -> str | None:
        """Factories named by their 0.1 module paths (before geoseg had subpackages) still load."""
        if value is None:
            return value
        target, sep, attr = value.rpartition(":")
        return f"{MOVED_FACTORY_MODULES.get(target, target)}{sep}{attr}"

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
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
        n_norm = normalize_values(self.normalize)
        if n_norm is not None and n_norm != len(self.bands):
            raise ValueError(
                f"bands {self.bands} feed {len(self.bands)} band(s) to a model whose normalize has "
                f"{n_norm} values per band (it reads {n_norm} bands); list {n_norm} band indexes"
            )
        if self.input.names is not None and len(self.input.names) != len(self.bands):
            raise ValueError(f"input.names has {len(self.input.names)} names for {len(self.bands)} bands")
        sources = [k for k in ("factory", "weights", "torchscript") if getattr(self, k) is not None]
        if not sources:
            if self.arch is not None:
                raise ValueError(f"arch '{self.arch}' needs 'weights' (save_pretrained directory, .safetensors or .pt)")
            raise ValueError(
                "no model source: set one of 'factory: file.py:callable', 'weights: DIR_OR_FILE' "
                "(+ 'arch', 'encoder') or 'torchscript: FILE'"
            )
        if len(sources) > 1:
            raise ValueError(f"set only one model source, got {' and '.join(sources)}")
        if (self.arch or self.encoder or self.arch_params) and self.weights is None:
            raise ValueError("'arch', 'encoder' and 'arch_params' go with 'weights'")
        return self

    @property
    def out_channels(self) -> int:
        """Channels the network must return: one per class, or one per instance channel."""
        return len(self.classes) if self.task == "semantic" else len(self.channels)


class Config(_Frozen):
    """A whole run: tiling, runtime and the heads to run on every tile."""

    tiling: TilingConfig = TilingConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    output: OutputConfig = OutputConfig()
    models: dict[str, ModelConfig] = Field(min_length=1)
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
    flags = {}
    for section, values in (overrides or {}).items():
        given = {k: v for k, v in values.items() if v is not None}
        data[section] = {**(data.get(section) or {}), **given}
        flags.update({f"{section}.{k}": "--" + k.replace("_", "-") for k in given})
    try:
        return config_from_dict(data, str(path), str(path.resolve().parent))
    except ConfigError as exc:
        if exc.key in flags:  # the bad value came from a command-line flag, not the file
            raise ConfigError(flags[exc.key], "", exc.problem) from None
        raise
