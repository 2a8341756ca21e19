"""The model alone in a loop on the CPU (a subprocess of ``bench.run``): the pipeline's upper bound.

Same network and batch size as the pipeline, input at the pipeline's padded tile side
(``geoseg.raster.grid.padded_size(tile, halo)``), torch on ``--threads`` threads (default: every core,
``os.cpu_count()``); random float input already normalised; forward + argmax to uint8 (the actor's
own per-pixel step). One warm-up batch, then ``--batches`` timed batches per variant (layout x call size); the figure
is the median of the fastest variant.
Mpx/s counts core pixels (``tile_size^2`` per tile), as the pipeline's figure does.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import time


def state_digest(model: object) -> str:
    """A short digest of a model's weights, to show two processes ran the same network."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):  # type: ignore[attr-defined]
        h.update(name.encode())
        h.update(tensor.detach().to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--factory", required=True, help="module:callable")
    ap.add_argument("--tile-size", type=int, default=512)
    ap.add_argument("--halo", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--save-state", default=None, help="also save the model's state_dict here (torch.save)")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    import torch

    from geoseg.raster.grid import padded_size

    torch.set_num_threads(args.threads)
    module, attr = args.factory.split(":")
    model = getattr(importlib.import_module(module), attr)().eval()
    if args.save_state:
        torch.save(model.state_dict(), args.save_state)
    side = padded_size(args.tile_size, args.halo)
    x = torch.rand(args.batch_size, 3, side, side, generator=torch.Generator().manual_seed(0))
    # Both memory layouts and both ways of feeding a batch (the whole batch in one call, or one
    # tile per call as geoseg does on the CPU); the fastest is "the model alone", so the ratio
    # never credits the pipeline with a layout or call-size gain.
    times_by_variant: dict[str, list[float]] = {}
    for layout in ("contiguous", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        m, xl = model.to(memory_format=fmt), x.contiguous(memory_format=fmt)
        for calls in ("batch", "per_tile"):
            step = args.batch_size if calls == "batch" else 1
            variant = f"{layout}/{calls}"
            times_by_variant[variant] = []
            with torch.inference_mode():
                m(xl[:step]).argmax(dim=1).to(torch.uint8)  # warm-up: allocator, kernels
                for _ in range(args.batches):
                    t = time.perf_counter()
                    for i in range(0, args.batch_size, step):
                        m(xl[i : i + step]).argmax(dim=1).to(torch.uint8)
                    times_by_variant[variant].append(time.perf_counter() - t)
    best = min(times_by_variant, key=lambda k: statistics.median(times_by_variant[k]))
    times = times_by_variant[best]
    per_batch = statistics.median(times)
    out = {
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "tile_size": args.tile_size,
        "halo": args.halo,
        "padded_side": side,
        "layout": best.split("/")[0],
        "calls": best.split("/")[1],
        "median_batch_s_by_variant": {k: round(statistics.median(v), 4) for k, v in times_by_variant.items()},
        "batch_seconds": [round(t, 4) for t in times],
        "median_batch_s": round(per_batch, 4),
        "mpx_per_s": round(args.batch_size * args.tile_size**2 / per_batch / 1e6, 4),
        "weights_digest": state_digest(model),
    }
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
