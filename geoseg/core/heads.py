"""What one head of a run is (``ModelConfig``): its network's source, task, classes, bands, input
contract, normalisation and decoding; validated before any pixel is read. The run configuration
(``geoseg.core.config``) holds one per model name."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

InstanceChannel = Literal["body", "border", "contact"]

# Built-in factory modules that moved into subpackages: configs written for geoseg 0.1 name the old paths.
MOVED_FACTORY_MODULES = {"geoseg.csmask": "geoseg.models.csmask", "geoseg.synth": "geoseg.train.synth"}


class Frozen(BaseModel):
    # frozen: safe to ship to actors; forbid: a typo in a key fails instead of being ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScaleNormalize(Frozen):
    """Divide raw values by ``scale`` (255 for 8-bit imagery)."""

    scale: float = Field(gt=0)


class MeanStdNormalize(Frozen):
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


class ClipNormalize(Frozen):
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


class DbNormalize(Frozen):
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


class InputSpec(Frozen):
    """What rasters a model was trained on (the input contract); checked against every scene header.

    ``None`` means "not checked". ``count`` is the band count of the training rasters: a scene with
    another count fails unless the config sets ``bands`` itself (an explicit band mapping).
    """

    count: int | None = Field(default=None, ge=1)
    names: list[str] | None = None  # names of the bands the model reads, in order (e.g. [red, green, blue])
    dtype: str | None = None  # pixel type the normalisation expects, e.g. uint8, uint16, float32
    gsd_m: float | None = Field(default=None, gt=0)  # ground sample distance of the training data, metres
    gsd_tolerance: float = Field(default=3.0, gt=1)  # a scene fails when its GSD differs by more than this factor


class TrainedOn(Frozen):
    """What imagery a model learned from (its contract's ``trained_on``), so that a run can say when
    a scene is unlike it: ``synthetic`` models (trained only on ``geoseg synth`` scenes) warn on
    every raster that geoseg synth did not write."""

    imagery: Literal["synthetic", "real"]
    source: str = ""  # the data set, in a few words


class ModelConfig(Frozen):
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
