"""A trained model's directory: ``config.json`` + ``model.safetensors`` (fp16) + ``geoseg.json`` (its
input contract, what it was trained on and its held-out scores), written so ``geoseg run`` loads it
as it is, and read back for re-scoring."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from geoseg.core.contract import resolve, save_contract
from geoseg.core.heads import ModelConfig
from geoseg.train.config import TrainConfig
from geoseg.train.data import Scene, _open

if TYPE_CHECKING:
    from segmentation_models_pytorch.base import SegmentationModel


def model_contract(cfg: TrainConfig, spec: ModelConfig, scenes: list[Scene], dtype: str) -> dict[str, Any]:
    from geoseg.core.contract import scene_gsd_m

    first = scenes[0]
    gsd = cfg.gsd_m if cfg.gsd_m is not None else cfg.resample_m
    if gsd is None:
        h, w = first.valid.shape
        gsd = float(f"{scene_gsd_m(first.crs.to_wkt(), first.transform, w, h):.3g}")
    contract: dict[str, Any] = {
        "name": cfg.name,
        "task": cfg.task,
        "classes": cfg.classes,
        "colors": cfg.colors,
        "bands": list(cfg.bands),
        "input": {"count": _source_count(cfg, first), "names": cfg.band_names, "dtype": dtype, "gsd_m": gsd},
        "normalize": spec.normalize
        if isinstance(spec.normalize, str)
        else spec.normalize.model_dump(exclude_none=True, exclude_defaults=True),
        "trained_on": trained_on(cfg, scenes),
    }
    if cfg.task == "instance":
        contract["channels"] = cfg.channels
    contract.update(cfg.postprocess)
    return {k: v for k, v in contract.items() if v is not None}


def trained_on(cfg: TrainConfig, scenes: list[Scene]) -> dict[str, str]:
    """The contract's ``trained_on``: ``synthetic`` when every training scene is a ``geoseg synth``
    scene (generated here, or a file carrying its tag), else ``real``; ``source`` is the config's ``data``."""
    from geoseg.raster.read import is_synthetic

    def synthetic(scene: Scene) -> bool:
        if scene.spec.synth is not None:
            return True
        images = [scene.spec.image] if isinstance(scene.spec.image, str) else list(scene.spec.image or [])
        for image in images:
            with _open(resolve(image, cfg.base_dir)) as ds:
                if not is_synthetic(ds.tags()):
                    return False
        return bool(images)

    training = [s for s in scenes if s.spec.split != "holdout"]
    imagery = "synthetic" if all(synthetic(s) for s in training) else "real"
    source = cfg.data or (
        "`geoseg synth` scenes"
        if imagery == "synthetic"
        else ", ".join(sorted({s.name.split(":", 1)[-1] for s in training}))
    )
    return {"imagery": imagery, "source": source}


def _source_count(cfg: TrainConfig, scene: Scene) -> int | None:
    if scene.spec.synth is not None:
        return 3
    images = [scene.spec.image] if isinstance(scene.spec.image, str) else list(scene.spec.image or [])
    if len(images) != 1:
        return None  # stacked from several files: the run reads a stack (VRT) built the same way
    with _open(resolve(images[0], cfg.base_dir)) as ds:
        return int(ds.count)


def write_model_dir(out: Path, cfg: TrainConfig, state: dict[str, torch.Tensor], contract: dict[str, Any]) -> Path:
    """``config.json`` + ``model.safetensors`` (fp16) via smp's save_pretrained, and ``geoseg.json``."""
    from geoseg.models.load import create_smp

    model = create_smp(
        cfg.name, cfg.model.arch, cfg.model.encoder, len(cfg.bands), cfg.out_channels, cfg.model.arch_params
    )
    model.load_state_dict(state)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    smp_model = cast("SegmentationModel", model.half())  # create_smp makes smp models: they have save_pretrained
    smp_model.save_pretrained(str(tmp))
    own = {k: v for k, v in cfg.model.arch_params.items() if k.startswith("_")}  # geoseg's, e.g. _drop_unused_blocks
    if own:
        saved = json.loads((tmp / "config.json").read_text())
        (tmp / "config.json").write_text(json.dumps({**saved, **own}, indent=2))
    (tmp / "README.md").unlink(missing_ok=True)  # smp's card claims an MIT licence; geoseg.json is the card
    save_contract(tmp, contract)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def load_trained(out: Path, name: str = "model") -> tuple[ModelConfig, torch.nn.Module]:
    """Load a model directory as ``geoseg run`` does (contract defaults, smp weights)."""
    from geoseg.core.config import config_from_dict
    from geoseg.models.load import build_model

    config = config_from_dict({"models": {name: {"weights": str(out.resolve())}}})
    spec = config.models[name]
    return spec, build_model(name, spec, config.base_dir)
