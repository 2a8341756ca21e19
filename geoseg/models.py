"""Build the networks named in a config, and check them before any tile is read.

A network takes ``B x C x H x W`` float (``C = len(bands)``, normalised as configured) and returns
``B x K x H x W`` logits: ``K`` classes for a semantic head, ``K`` channels (body[, border,
contact]) for an instance head.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable

import torch

from geoseg.config import Config, ModelConfig
from geoseg.errors import ModelError


def _load_callable(name: str, spec: str, base_dir: str) -> Callable[..., torch.nn.Module]:
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ModelError(name, f"factory '{spec}' must be 'file.py:callable' or 'module:callable'")
    if target.endswith(".py"):
        path = Path(target) if Path(target).is_absolute() else Path(base_dir) / target
        if not path.is_file():
            raise ModelError(name, f"factory file not found: {path}")
        mod_name = f"geoseg_factory_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(mod_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            assert loader_spec and loader_spec.loader
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module
            loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ModelError(name, f"cannot import factory module '{target}': {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ModelError(name, f"factory '{spec}' has no callable '{attr}'")
    return fn


def build_model(name: str, spec: ModelConfig, base_dir: str = ".") -> torch.nn.Module:
    """Instantiate the network of one head, in eval mode on the CPU."""
    assert spec.factory is not None
    fn = _load_callable(name, spec.factory, base_dir)
    try:
        model = fn()
    except Exception as exc:  # a user's factory may raise anything; say whose it was
        raise ModelError(name, f"factory '{spec.factory}' failed: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise ModelError(name, f"factory '{spec.factory}' returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def check_model(name: str, spec: ModelConfig, model: torch.nn.Module, side: int = 64) -> None:
    """Run one small zero batch and check the output shape against the config."""
    x = torch.zeros(1, len(spec.bands), side, side)
    try:
        with torch.inference_mode():
            y = model(x)
    except Exception as exc:
        raise ModelError(name, f"fails on a 1x{len(spec.bands)}x{side}x{side} input ({exc})") from None
    want = (1, spec.out_channels, side, side)
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != want:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        what = "classes" if spec.task == "semantic" else f"channels {spec.channels}"
        raise ModelError(name, f"returns {got}, expected {want} (one channel per {what})")


def check_models(config: Config) -> None:
    """Build and check every head; raises ModelError naming the first that fails."""
    for name, spec in config.models.items():
        check_model(name, spec, build_model(name, spec, config.base_dir))
