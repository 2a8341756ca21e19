"""Traced copies of the smp networks (``geoseg.models.traced``): written once, found again only for
the same weights, giving exactly what the network smp builds gives on real imagery, and loaded by
a fresh model actor's process without importing segmentation-models-pytorch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window
from safetensors.torch import load_file, save_file

from geoseg.core.config import load_config
from geoseg.models.forward import normalize
from geoseg.models.load import build_model
from geoseg.models.traced import CACHE_ENV, build_for_inference

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "networks"


def _nairobi(shared: Path, spec) -> torch.Tensor:
    """A 256^2 piece of the held-out city's drone image (real roofs, roads, trees), normalised as
    the head normalises it."""
    with rasterio.open(shared / "hotosm_buildings/nairobi.tif") as src:
        rgb = src.read([1, 2, 3], window=Window(1024, 6400, 256, 256)).astype(np.float32)
    return normalize(torch.from_numpy(rgb)[None], spec)


def test_a_traced_copy_gives_exactly_what_smp_builds(shared_data, cache):
    config = load_config(REPO / "configs/aerial.yaml")
    for name, spec in config.models.items():
        eager = build_model(name, spec, config.base_dir)
        first = build_for_inference(name, spec, config.base_dir, CPU)  # builds from smp, writes the copy
        (written,) = cache.glob(f"{name}-*.pt")
        traced = build_for_inference(name, spec, config.base_dir, CPU)
        assert isinstance(traced, torch.jit.ScriptModule) and not isinstance(first, torch.jit.ScriptModule)
        x = _nairobi(shared_data, spec).contiguous(memory_format=torch.channels_last)
        traced = traced.to(memory_format=torch.channels_last)
        eager = eager.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            assert torch.equal(traced(x), eager(x)), name
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert torch.equal(traced(x), eager(x)), name
        assert [p.name for p in cache.glob(f"{name}-*.pt")] == [written.name]  # found, not written again


def test_other_weights_get_their_own_copy(cache, tmp_path):
    config = load_config(REPO / "configs/aerial.yaml")
    spec = config.models["landuse"]
    build_for_inference("landuse", spec, config.base_dir, CPU)
    changed = tmp_path / "changed-landuse"
    shutil.copytree(REPO / "models/aerial-landuse", changed)
    weights = load_file(str(changed / "model.safetensors"))
    key = next(k for k in weights if k.endswith("weight") and weights[k].ndim == 4)
    weights[key] = weights[key] * 0.5
    save_file(weights, str(changed / "model.safetensors"))
    other = spec.model_copy(update={"weights": str(changed)})

    build_for_inference("landuse", other, config.base_dir, CPU)  # writes a second copy
    assert len(list(cache.glob("landuse-*.pt"))) == 2
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        from_copy = build_for_inference("landuse", other, config.base_dir, CPU)(x)
        assert torch.equal(from_copy, build_model("landuse", other, config.base_dir)(x))
        assert not torch.equal(from_copy, build_model("landuse", spec, config.base_dir)(x))


def test_a_damaged_copy_is_built_again(cache):
    config = load_config(REPO / "configs/aerial.yaml")
    spec = config.models["buildings"]
    build_for_inference("buildings", spec, config.base_dir, CPU)
    (copy,) = cache.glob("buildings-*.pt")
    copy.write_bytes(b"not a TorchScript archive")
    model = build_for_inference("buildings", spec, config.base_dir, CPU)
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), build_model("buildings", spec, config.base_dir)(x))
    assert isinstance(torch.jit.load(str(copy)), torch.jit.ScriptModule)  # written again, whole


def test_off_writes_nothing_and_other_sources_are_left_alone(tmp_path, monkeypatch, oracle_config_path):
    monkeypatch.setenv(CACHE_ENV, "off")
    config = load_config(REPO / "configs/aerial.yaml")
    model = build_for_inference("landuse", config.models["landuse"], config.base_dir, CPU)
    assert not isinstance(model, torch.jit.ScriptModule)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    oracle = load_config(oracle_config_path)  # factories: never traced
    for name, spec in oracle.models.items():
        assert not isinstance(build_for_inference(name, spec, oracle.base_dir, CPU), torch.jit.ScriptModule)
    assert not (tmp_path / "cache").exists()


def test_a_fresh_actor_process_loads_the_copies_without_smp(tmp_path):
    """What a model actor does at the start of a run, in a fresh interpreter: the first one writes
    the copies (importing smp), the next imports neither smp nor torch._dynamo."""
    code = (
        "import json, sys\n"
        "from geoseg.core.config import load_config\n"
        "from geoseg.models.infer import Predictor\n"
        f"p = Predictor(load_config({str(REPO / 'configs/default.yaml')!r}), num_threads=1)\n"
        "print(json.dumps({m: m in sys.modules for m in ('segmentation_models_pytorch', 'torch._dynamo')}))\n"
    )
    env = {**os.environ, CACHE_ENV: str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    first, second = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert first["segmentation_models_pytorch"]
    assert second == {"segmentation_models_pytorch": False, "torch._dynamo": False}
    assert len(list((tmp_path / "cache" / "networks").glob("*.pt"))) == 2


def test_missing_weights_still_fail_in_one_line_naming_the_model(cache, tmp_path):
    from geoseg.core.errors import ModelError

    spec = (
        load_config(REPO / "configs/aerial.yaml")
        .models["landuse"]
        .model_copy(update={"weights": str(tmp_path / "gone")})
    )
    with pytest.raises(ModelError, match="model 'landuse'"):
        build_for_inference("landuse", spec, str(tmp_path), CPU)
    assert not cache.exists()
