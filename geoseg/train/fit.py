"""``geoseg train``: GeoTIFFs + labels -> a model directory that ``geoseg run`` loads as it is.

Steps: read each scene (and its labels) into memory, split it into train and held-out parts
(whole scenes, or a band of rows), cut chips with ``geoseg.raster.grid.plan_tiles`` and pad them as the
predictor does, build targets (class per pixel; or body / border / contact from polygons), train
on Ray Train (``TorchTrainer``, one worker, a GPU when there is one), then score the held-out part
with sliding-window inference over the same tiling and write ``config.json`` +
``model.safetensors`` (fp16) + ``geoseg.json`` (input contract and metrics).

Training scenes are meant to be small (they are held in memory): chip a large raster first.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoseg.core.contract import resolve, save_contract
from geoseg.core.heads import ModelConfig
from geoseg.train.config import TrainConfig
from geoseg.train.data import fit_normalize, load_scene, make_chips
from geoseg.train.evaluate import IGNORE
from geoseg.train.model_dir import load_trained, model_contract, write_model_dir
from geoseg.train.score import evaluate

log = logging.getLogger("geoseg.train.fit")


# -------------------------------------------------------------------------------------- training


def _head_spec(cfg: TrainConfig, normalize: Any) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "task": cfg.task,
            "classes": cfg.classes,
            "colors": cfg.colors,
            "bands": list(range(1, len(cfg.bands) + 1)),
            "normalize": normalize,
            "channels": cfg.channels,
            "factory": "geoseg.train.fit:_unused",
            **cfg.postprocess,
        }
    )


def _loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    valid: torch.Tensor,
    task: str,
    class_weights: torch.Tensor | None = None,
    dice: bool = False,
) -> torch.Tensor:
    if task == "semantic":
        y = torch.where(valid, y.long(), torch.full_like(y.long(), IGNORE))
        ce = torch.nn.functional.cross_entropy(logits, y, weight=class_weights, ignore_index=IGNORE)
        if not dice:
            return ce
        # Soft dice per class over the batch (labelled pixels only): what IoU rewards, for every
        # class alike however few its pixels.
        v = valid[:, None].float()
        p = torch.softmax(logits, 1) * v
        t = torch.nn.functional.one_hot(torch.where(valid, y, 0), logits.shape[1]).permute(0, 3, 1, 2).float() * v
        dims = (0, 2, 3)
        present = t.sum(dims) > 0
        d = 1 - (2 * (p * t).sum(dims) + 1) / (p.sum(dims) + t.sum(dims) + 1)
        return ce + (d[present].mean() if present.any() else 0.0)
    v = valid[:, None].float()
    yf = y.float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, yf, reduction="none")
    bce = (bce * v).sum() / v.sum().clamp(min=1) / logits.shape[1]
    # Soft dice per channel: border and contact are a few per cent of the pixels, BCE alone
    # learns to leave them out.
    p = torch.sigmoid(logits) * v
    t = yf * v
    dims = (0, 2, 3)
    dice_loss = 1 - (2 * (p * t).sum(dims) + 1) / (p.sum(dims) + t.sum(dims) + 1)
    return bce + dice_loss.mean()


def _augment(*tensors: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    k = int(torch.randint(0, 4, (1,), generator=gen))
    flip = bool(torch.randint(0, 2, (1,), generator=gen))
    out = []
    for t in tensors:
        t = torch.rot90(t, k, dims=(-2, -1))
        out.append(torch.flip(t, dims=(-1,)) if flip else t)
    return tuple(out)


def train_loop(loop_cfg: dict[str, Any]) -> None:
    """Ray Train worker: chips from the object store -> AdamW + one-cycle -> state dict checkpoint."""
    import os

    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from geoseg.models.forward import mask_invalid, normalize
    from geoseg.models.load import create_smp

    torch.manual_seed(loop_cfg["seed"])
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(loop_cfg["threads"])
    chips = ray.get(loop_cfg["chips"])
    spec = ModelConfig.model_validate(loop_cfg["spec"])
    arch = loop_cfg["arch"]
    model = create_smp("train", arch["arch"], arch["encoder"], len(spec.bands), spec.out_channels, arch["arch_params"])
    if loop_cfg.get("init_state") is not None:  # a second round goes on from the first's weights
        model.load_state_dict(ray.get(loop_cfg["init_state"]))
    model = ray.train.torch.prepare_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=loop_cfg["lr"], weight_decay=loop_cfg["weight_decay"])
    steps = loop_cfg["steps"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=loop_cfg["lr"], total_steps=steps, pct_start=0.15)
    x_all = torch.from_numpy(chips["x"])  # raster dtype; a batch at a time becomes float32
    y_all, v_all = torch.from_numpy(chips["y"]), torch.from_numpy(chips["valid"])
    iv_all = torch.from_numpy(chips["image_valid"])
    cw = loop_cfg.get("class_weights")
    class_weights = torch.tensor(cw, dtype=torch.float32, device=device) if cw else None
    weights = torch.from_numpy(chips["weights"]).double()
    gen = torch.Generator().manual_seed(loop_cfg["seed"] + ray.train.get_context().get_world_rank())
    bs = loop_cfg["batch_size"]
    jitter = float(loop_cfg.get("color_jitter") or 0.0)
    model.train()
    losses: list[float] = []
    use_amp = device.type == "cuda"
    for step in range(steps):
        idx = torch.multinomial(weights, bs, replacement=True, generator=gen)
        x, y, v, iv = _augment(x_all[idx], y_all[idx], v_all[idx], iv_all[idx], gen=gen)
        x, y, v, iv = x.to(device), y.to(device), v.to(device), iv.to(device)
        x = normalize(x.float(), spec)
        if jitter > 0:
            b, c = x.shape[:2]
            gain = 1 + jitter * torch.randn((b, c, 1, 1), generator=gen).to(device)
            x = x * gain + jitter * torch.randn((b, c, 1, 1), generator=gen).to(device)
        x = mask_invalid(x, iv)
        if use_amp:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(x)
        loss = _loss(logits.float(), y, v, spec.task, class_weights, loop_cfg.get("dice", False))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
        if (step + 1) % max(1, steps // 10) == 0 and ray.train.get_context().get_world_rank() == 0:
            print(f"step {step + 1}/{steps} loss {np.mean(losses[-20:]):.4f}", flush=True)
    metrics = {"train_loss": round(float(np.mean(losses[-20:])), 5), "steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            net = getattr(model, "module", model)
            torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, os.path.join(tmp, "state.pt"))
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def _fit(
    cfg: TrainConfig,
    spec: ModelConfig,
    chips: dict[str, np.ndarray],
    storage: Path,
    *,
    steps: int,
    hard: np.ndarray | None = None,
    init_state: dict | None = None,
) -> tuple[dict[str, Any], dict]:
    """``steps`` of training on Ray Train, from ``init_state`` (else at random). A hard round passes
    ``hard`` (the chips the previous round's network got most wrong, drawn ``train.hard_weight``
    times as often) and starts from the previous round's weights."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if cfg.task == "instance":
        positive = chips["y"][:, 0].reshape(len(chips["y"]), -1).any(1)
        chips["weights"] = np.where(positive, cfg.train.positive_weight, 1.0)
    else:
        chips["weights"] = np.ones(len(chips["x"]))
    if hard is not None:
        chips["weights"] = chips["weights"] * np.where(hard, cfg.train.hard_weight, 1.0)
    class_weights = None
    if cfg.task == "semantic" and cfg.train.class_weighting == "inverse_sqrt":
        counts = np.array([((chips["y"] == k) & chips["valid"]).sum() for k in range(len(cfg.classes))], np.float64)
        w = np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1)), 0.0)
        class_weights = [round(float(v), 6) for v in w / w[w > 0].mean()]
    use_gpu = torch.cuda.is_available()
    loop_cfg = {
        "chips": ray.put(chips),
        "spec": spec.model_dump(),
        "arch": cfg.model.model_dump(),
        "steps": steps,
        "init_state": None if init_state is None else ray.put(init_state),
        "batch_size": cfg.train.batch_size,
        "lr": cfg.train.lr,
        "weight_decay": cfg.train.weight_decay,
        "seed": cfg.train.seed,
        "threads": cfg.train.threads,
        "class_weights": class_weights,
        "color_jitter": cfg.train.color_jitter,
        "dice": cfg.train.dice,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=use_gpu, resources_per_worker=None if use_gpu else {"CPU": 1}
        ),
        run_config=RunConfig(storage_path=str(storage), name=cfg.name),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    assert result.checkpoint is not None
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    return dict(result.metrics or {}), state


def initial_state(cfg: TrainConfig, spec: ModelConfig) -> dict[str, torch.Tensor]:
    """The network's starting weights: those of ``model.init`` wherever a layer has the same name
    and shape, random (seeded) elsewhere. Raises when no encoder layer fits (a wrong network)."""
    from geoseg.core.errors import ModelError
    from geoseg.models.load import create_smp, load_callable

    assert cfg.model.init is not None
    arch = cfg.model
    torch.manual_seed(cfg.train.seed)
    model = create_smp(cfg.name, arch.arch, arch.encoder, len(spec.bands), spec.out_channels, arch.arch_params)
    state = model.state_dict()
    source = load_callable(cfg.name, cfg.model.init, cfg.base_dir)().state_dict()
    fits = [k for k, v in state.items() if k in source and source[k].shape == v.shape]
    encoder = [k for k in state if k.startswith("encoder.")]
    if not any(k.startswith("encoder.") for k in fits):
        raise ModelError(cfg.name, f"model.init {cfg.model.init}: no encoder layer fits this network")
    log.info(
        "%s: %d of %d encoder tensors and %d others from %s",
        cfg.name,
        sum(k.startswith("encoder.") for k in fits),
        len(encoder),
        sum(not k.startswith("encoder.") for k in fits),
        cfg.model.init,
    )
    return {k: (source[k].clone() if k in fits else v) for k, v in state.items()}


@torch.inference_mode()
def hard_chips(cfg: TrainConfig, spec: ModelConfig, state: dict, chips: dict[str, np.ndarray]) -> np.ndarray:
    """The chips a network (``state``) gets most wrong: the ``train.hard_fraction`` of chips with the
    most wrong valid pixels (instance: body above its threshold where there is no object, or below
    it where there is one; semantic: another class). Wrong pixels are counted, not a share: a chip
    with one false ship counts as much wherever it lies."""
    from geoseg.models.forward import WIDEN, mask_invalid, normalize, predict_probs
    from geoseg.models.load import create_smp

    arch = cfg.model
    model = create_smp("score", arch.arch, arch.encoder, len(spec.bands), spec.out_channels, arch.arch_params)
    model.load_state_dict(state)
    model.eval()
    wrong = np.zeros(len(chips["x"]), np.int64)
    for start in range(0, len(chips["x"]), 64):
        part = slice(start, start + 64)
        raw = chips["x"][part]
        x = torch.from_numpy(raw.astype(WIDEN.get(raw.dtype, raw.dtype), copy=False)).float()
        x = mask_invalid(normalize(x, spec), torch.from_numpy(chips["image_valid"][part]))
        probs = predict_probs(model, x, spec).numpy()
        y, valid = chips["y"][part], chips["valid"][part]
        if cfg.task == "semantic":
            miss = probs.argmax(1) != y
        else:
            miss = (probs[:, 0] > spec.threshold) != (y[:, 0] > 0)
        wrong[part] = (miss & valid).reshape(len(y), -1).sum(1)
    cut = np.quantile(wrong, 1.0 - cfg.train.hard_fraction)
    return (wrong >= max(cut, 1)) & (wrong > 0)


def train(cfg: TrainConfig, evaluate_only: bool = False, address: str | None = None) -> dict[str, Any]:
    """Train (or, with ``evaluate_only``, re-score the existing model) and return the contract."""
    started = time.monotonic()
    out = resolve(cfg.out, cfg.base_dir)
    with tempfile.TemporaryDirectory(prefix="geoseg-train-") as tmp:
        work = Path(tmp)
        scenes = [load_scene(cfg, s, work, i) for i, s in enumerate(cfg.scenes)]
        dtype = str(np.result_type(*[s.image.dtype for s in scenes]))
        if evaluate_only:
            spec, model = load_trained(out)
            metrics = evaluate(cfg, spec, model, scenes)
            contract = json.loads((out / "geoseg.json").read_text())
            return {**contract, "metrics": metrics}
        normalize = fit_normalize(cfg, scenes)
        spec = _head_spec(cfg, normalize)
        chips = make_chips(cfg, scenes)
        log.info("%s: %d chips of %d px from %d scene(s)", cfg.name, len(chips["x"]), chips["x"].shape[-1], len(scenes))
        from geoseg.runner.local_ray import ensure_ray

        ensure_ray(address)
        start = initial_state(cfg, spec) if cfg.model.init else None
        fit_metrics, state = _fit(cfg, spec, chips, work / "ray", init_state=start, steps=cfg.train.steps)
        hard = None
        for round_ in range(cfg.train.hard_rounds if cfg.train.hard_steps > 0 else 0):
            hard = hard_chips(cfg, spec, state, chips)  # those the latest weights get most wrong
            log.info("%s: hard round %d on %d chip(s) of %d", cfg.name, round_ + 1, int(hard.sum()), len(hard))
            fit_metrics, state = _fit(
                cfg, spec, chips, work / f"ray{round_ + 2}", hard=hard, init_state=state, steps=cfg.train.hard_steps
            )
        contract = model_contract(cfg, spec, scenes, dtype)
        contract["training"] = {
            "config": cfg.name,
            "arch": cfg.model.model_dump(),
            "chips": int(len(chips["x"])),
            "chip_px": int(chips["x"].shape[-1]),
            "steps": cfg.train.steps,
            **(
                {
                    "hard_steps": cfg.train.hard_steps,
                    "hard_rounds": cfg.train.hard_rounds,
                    "hard_chips": int(hard.sum()),
                }
                if hard is not None
                else {}
            ),
            "batch_size": cfg.train.batch_size,
            "train_loss": fit_metrics.get("train_loss"),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "seconds": round(time.monotonic() - started, 1),
        }
        if cfg.data:
            contract["data"] = cfg.data
        if cfg.licence:
            contract["licence"] = cfg.licence
        write_model_dir(out, cfg, state, contract)
        spec_loaded, model = load_trained(out)  # score what was written (fp16 weights), as run loads it
        contract["metrics"] = evaluate(cfg, spec_loaded, model, scenes)
        contract["size_bytes"] = sum(f.stat().st_size for f in out.iterdir())
        save_contract(out, {k: v for k, v in contract.items() if k != "geoseg_contract"})
        return contract


def summary_lines(contract: dict[str, Any]) -> list[str]:
    """Human lines for the held-out metrics of a contract: all held-out places, then each place."""
    m = contract.get("metrics") or {}

    def line(m: dict[str, Any]) -> str:
        if "iou" in m:
            per = ", ".join(f"{c} {v:.3f}" if v is not None else f"{c} -" for c, v in m["iou"].items())
            return f"mean IoU {m['mean_iou']}, pixel accuracy {m['pixel_accuracy']} ({per})"
        o = m["objects"]
        return (
            f"objects: {o['predicted']} predicted / {o['truth']} true, precision {o['precision']:.3f}, "
            f"recall {o['recall']:.3f}, F1 {o['f1']:.3f} at IoU {o.get('iou_threshold', 0.5)}; "
            f"body IoU {m['body_iou']}"
        )

    if "iou" not in m and "objects" not in m:
        return []
    lines = [f"held-out {line(m)}"]
    for place, pm in (m.get("places") or {}).items():
        lines.append(f"  {place}: {line(pm)}")
    return lines
