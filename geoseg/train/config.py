"""The ``geoseg train`` configuration: scenes, labels, held-out split, architecture, steps.

Relative paths resolve against the YAML's folder; errors name the file and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from geoseg.core.config import TilingConfig, read_yaml_mapping
from geoseg.core.errors import ConfigError
from geoseg.core.heads import InstanceChannel, Normalize


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SynthSource(_Strict):
    """A scene written by ``geoseg synth`` at training time (reproducible from size and seed)."""

    size: int = Field(default=1024, ge=64)
    seed: int = 0
    touching_pairs: int = 0


class Holdout(_Strict):
    """Rows ``[start, end)`` (fractions of the height) held out of training and scored."""

    rows: tuple[float, float] = (0.75, 1.0)


class SceneSpec(_Strict):
    """One training scene: an image (one file, or one file per band, stacked) or a synthetic scene,
    and its labels: a label raster, polygons (GeoPackage / GeoJSON / shapefile), COCO JSON (pixel
    RLE masks, as the Sentinel-2 ships), or a synthetic scene's truth (``landuse``/``buildings``/``ships``)."""

    image: str | list[str] | None = None
    synth: SynthSource | None = None
    labels: str
    layer: str | None = None  # vector layer (GeoPackage)
    class_field: str | None = None  # semantic polygons: attribute holding the class name
    class_values: dict[int, str] | None = None  # label raster value -> class name (others ignored)
    split: Literal["train", "holdout", "both"] = "train"  # 'both': holdout rows below, training above
    holdout: Holdout = Holdout()
    # A colour-coded label image (PNG): hex colour -> class name; pixels of other colours are ignored.
    label_colors: dict[str, str] | None = None
    # Ground pixel size (m) of an image without a georeference (or to override its own).
    pixel_size_m: float | None = Field(default=None, gt=0)
    # Name of the place, for held-out scores per place (default: the image file's stem).
    place: str | None = None

    @model_validator(mode="after")
    def _one_image(self) -> SceneSpec:
        if (self.image is None) == (self.synth is None):
            raise ValueError("set exactly one of 'image' and 'synth'")
        return self


class ArchSpec(_Strict):
    arch: str = "Unet"
    encoder: str = "tu-resnet10t"
    arch_params: dict[str, Any] = {"encoder_depth": 3, "decoder_channels": [64, 32, 16]}
    # A network to start from ('module:callable', as a head's factory): its weights fill every layer
    # of this one with the same name and shape (a published encoder); the rest starts at random.
    init: str | None = None


class AutoNormalize(_Strict):
    """Normalisation computed on the training pixels: per-band mean/std, percentile clip, or dB."""

    auto: Literal["meanstd", "clip", "db"]
    percentiles: tuple[float, float] = (2.0, 98.0)


class TrainParams(_Strict):
    steps: int = Field(default=300, ge=1)
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    seed: int = 0
    threads: int = Field(default=1, ge=1)  # torch threads per worker on the CPU
    # instance tasks: chips with objects are drawn this much more often
    positive_weight: float = Field(default=3.0, ge=1)
    # semantic tasks: weight the loss of each class by 1/sqrt(its training pixels) (rare classes count more)
    class_weighting: Literal["none", "inverse_sqrt"] = "none"
    num_workers: int = Field(default=1, ge=1)
    # Photometric augmentation: per chip and band, gain 1 + N(0, j) and offset N(0, j) on the
    # normalised values (places differ in light, season and sensor more than in geometry).
    color_jitter: float = Field(default=0.0, ge=0)
    # Chips per scene grid: 2 adds a second grid shifted by half a chip (objects cut by one grid
    # lie whole in the other).
    chip_grids: Literal[1, 2] = 1
    dice: bool = False  # semantic tasks: add a soft-dice term per class to the cross-entropy
    # Hard chips: after ``steps``, ``hard_rounds`` rounds of ``hard_steps`` each from the previous
    # round's weights, drawing the ``hard_fraction`` of chips the previous round got most wrong
    # ``hard_weight`` times as often (e.g. piers and breakwaters taken for ships). 0 steps: none.
    hard_steps: int = Field(default=0, ge=0)
    hard_rounds: int = Field(default=1, ge=1)
    hard_fraction: float = Field(default=0.1, gt=0, le=1)
    hard_weight: float = Field(default=4.0, ge=1)


class TrainConfig(_Strict):
    """A training run: what to learn, from which scenes, and where the model directory goes."""

    name: str
    out: str
    task: Literal["semantic", "instance"]
    classes: list[str] = Field(min_length=1)
    colors: list[str] | None = None
    channels: list[InstanceChannel] = ["body"]
    bands: list[int] = Field(min_length=1)
    band_names: list[str] | None = None
    gsd_m: float | None = None  # default: resample_m, else the first scene's
    # Pixel size (m) every scene is resampled to when read (average of the image's pixels; polygon
    # labels are burnt on the new grid), e.g. 0.3 for 0.075 m drone imagery.
    resample_m: float | None = Field(default=None, gt=0)
    normalize: Union[AutoNormalize, Normalize] = "none"
    model: ArchSpec = ArchSpec()
    scenes: list[SceneSpec] = Field(min_length=1)
    chip_size: int = Field(default=96, ge=16)  # core pixels per chip (plan_tiles' tile_size)
    chip_halo: int = Field(default=16, ge=0)  # context each side; chips are padded to a multiple of 32
    # Held-out scoring runs the model as ``geoseg run`` does by default: blended windows of
    # ``eval_window`` pixels sharing ``eval_overlap`` (tiling.window / tiling.overlap). ``none``: the
    # core-crop tiles of ``eval_tile_size`` + ``eval_halo`` (tiling.blend: none).
    eval_blend: Literal["hann", "none"] = "hann"
    eval_window: int = Field(default=TilingConfig.model_fields["window"].default, ge=32)
    eval_overlap: int = Field(default=TilingConfig.model_fields["overlap"].default, ge=0)
    eval_tile_size: int = Field(default=256, ge=32)
    eval_halo: int = Field(default=32, ge=0)
    eval_iou: float = Field(default=0.5, gt=0, le=1)  # instance tasks: IoU at which a prediction matches a truth
    train: TrainParams = TrainParams()
    postprocess: dict[str, Any] = {}  # thresholds etc. stored in the contract (ModelConfig keys)
    data: str = ""  # data source, for the model card
    licence: str = ""
    base_dir: str = "."

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.task == "instance" and len(self.classes) != 1:
            raise ValueError("an instance model has exactly one class")
        if self.band_names is not None and len(self.band_names) != len(self.bands):
            raise ValueError(f"{len(self.band_names)} band_names for {len(self.bands)} bands")
        if not any(s.split != "train" for s in self.scenes):
            raise ValueError("no held-out data: give a scene 'split: holdout' or 'split: both'")
        if not any(s.split != "holdout" for s in self.scenes):
            raise ValueError("no training data: every scene is 'split: holdout'")
        return self

    @property
    def out_channels(self) -> int:
        return len(self.classes) if self.task == "semantic" else len(self.channels)


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a training YAML (relative paths resolve against its folder)."""
    path = Path(path)
    data = read_yaml_mapping(path)
    if isinstance(data.get("scenes"), list):
        data["scenes"] = _expand_globs(data["scenes"], path.resolve().parent)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            data[key] = {**(data.get(key) or {}), **{k: v for k, v in value.items() if v is not None}}
        elif value is not None:
            data[key] = value
    try:
        return TrainConfig.model_validate({**data, "base_dir": str(path.resolve().parent)})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[")))
        raise ConfigError(str(path), key, err["msg"].removeprefix("Value error, ")) from None


def _expand_globs(scenes: list[Any], base: Path) -> list[Any]:
    """Globs (``*``, ``?``, ``[``) in scene images. An ``image`` that is one glob stands for one scene
    per matching file, sorted; ``{stem}`` in its ``labels`` is that file's name without its suffix.
    In a list of one-band files, each glob names exactly one file (e.g. ``*_B02*.tiff``)."""
    out: list[Any] = []
    for scene in scenes:
        image = scene.get("image") if isinstance(scene, dict) else None
        if isinstance(image, list):
            out.append({**scene, "image": [_one_match(i, base) if isinstance(i, str) else i for i in image]})
            continue
        if not isinstance(image, str) or not _is_glob(image):
            out.append(scene)
            continue
        matches = _matches(image, base)
        if not matches:
            raise ConfigError(str(base), "scenes", f"no file matches '{image}'")
        for m in matches:
            labels = scene.get("labels")
            if isinstance(labels, str):
                labels = str(resolve_label(labels.replace("{stem}", m.stem), base))
            out.append({**scene, "image": str(m), "labels": labels})
    return out


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _matches(pattern: str, base: Path) -> list[Path]:
    p = Path(pattern).expanduser()
    root = p if p.is_absolute() else base / p
    return sorted(Path(root.anchor).glob(str(root.relative_to(root.anchor))))


def _one_match(pattern: str, base: Path) -> str:
    if not _is_glob(pattern):
        return pattern
    matches = _matches(pattern, base)
    if len(matches) != 1:
        raise ConfigError(
            str(base), "scenes", f"'{pattern}' matches {len(matches)} files, a band file needs exactly one"
        )
    return str(matches[0])


def resolve_label(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or path in ("landuse", "buildings", "ships") else base / p
