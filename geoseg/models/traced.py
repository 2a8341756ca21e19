"""Traced copies of the smp networks a run builds, kept on disk, so that a model actor on the CPU
builds its networks without importing segmentation-models-pytorch.

Importing smp costs a model actor about 2 s of every run: smp imports timm, timm imports
torchvision, and torchvision imports ``torch._dynamo`` (1.1 s of it). A network traced once with
``torch.jit.trace`` loads in about 0.1 s with torch alone. A copy is written only if it gives
exactly the outputs of the network smp builds (float32 at two input sizes, and bfloat16 under
autocast), and it is found again only for the same weights, recipe and versions of torch, smp and
timm; anything else, or a copy that does not load, builds the network from smp as before. Only the
CPU uses the copies: nothing here could check a traced network against smp's on a GPU.

The copies live in ``GEOSEG_CACHE_DIR`` (default ``$XDG_CACHE_HOME/geoseg``, else
``~/.cache/geoseg``), under ``networks/``; ``GEOSEG_CACHE_DIR=off`` leaves them out.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from geoseg.core.contract import hash_files, model_files, resolve
from geoseg.core.heads import ModelConfig
from geoseg.models.load import build_model

CACHE_ENV = "GEOSEG_CACHE_DIR"
FORMAT = 1  # bump when what a copy holds, or how it is checked, changes
CHECK_SIDES = (64, 96)  # two input sizes: a trace that kept one size's shapes fails the other
_VERSIONED = ("torch", "segmentation-models-pytorch", "timm")


def cache_dir() -> Path | None:
    """Where traced copies go, or None when ``GEOSEG_CACHE_DIR`` is ``off``."""
    configured = os.environ.get(CACHE_ENV)
    if configured is not None:
        return None if configured.strip().lower() in ("", "off", "0", "none") else Path(configured) / "networks"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "geoseg" / "networks"


def build_for_inference(name: str, spec: ModelConfig, base_dir: str, device: torch.device) -> torch.nn.Module:
    """``build_model``, from a traced copy where one fits (CPU, smp weights), writing the copy
    the first time (see the module). In eval mode on the CPU, as ``build_model`` returns it."""
    folder = cache_dir()
    if spec.weights is None or device.type != "cpu" or folder is None:
        return build_model(name, spec, base_dir)
    key = _recipe_key(spec, base_dir)
    if key is None:
        return build_model(name, spec, base_dir)
    path = folder / f"{name}-{key}.pt"
    if path.is_file():
        try:
            with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(str(path), map_location="cpu").eval()
        except Exception:  # a damaged or foreign file: build from smp and write it again
            pass
    model = build_model(name, spec, base_dir)
    _write_copy(model, len(spec.bands), path)
    return model


def _recipe_key(spec: ModelConfig, base_dir: str) -> str | None:
    """Hash of everything the network depends on: its weight files (hashed as the run record
    hashes them, ``geoseg.core.contract.hash_files``), the head's build settings and the library
    versions. None if a file cannot be read (smp then says why)."""
    assert spec.weights is not None
    try:
        files = hash_files(model_files(resolve(spec.weights, base_dir)))
    except OSError:
        return None
    recipe = {
        "format": FORMAT,
        "files": files,
        "arch": spec.arch,
        "encoder": spec.encoder,
        "arch_params": spec.arch_params,
        "in_channels": len(spec.bands),
        "out_channels": spec.out_channels,
        "versions": [_version(d) for d in _VERSIONED],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _write_copy(model: torch.nn.Module, in_channels: int, path: Path) -> bool:
    """Trace ``model``, check the trace against it and write it to ``path`` (a temporary name,
    then a rename: runs on one machine may write the same copy at once). False if the trace does
    not match or cannot be written; the run goes on with ``model`` either way."""
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, in_channels, s, s, generator=generator) for s in CHECK_SIDES]
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # deprecation and tracer warnings: the check below decides
            traced = torch.jit.trace(model, inputs[0], check_trace=False)
            same = all(torch.equal(model(x), traced(x)) for x in inputs)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                same = same and torch.equal(model(inputs[0]), traced(inputs[0]))
        if not same:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                traced.save(tmp)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the copy from the node's other users
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except Exception:  # a network torch.jit cannot trace, or a cache that cannot be written
        return False
    return True
