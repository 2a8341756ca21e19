"""The model alone in a loop (a subprocess of ``bench.run``): the pipeline's upper bound.

Same network, batch size, padded tile side (core + 2 halo, rounded up to 32) and torch thread
count as the pipeline's actor; random float input already normalised. Output Mpx/s counts core
pixels (``tile_size^2`` per tile), as the pipeline's figure does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--factory", required=True, help="module:callable")
    ap.add_argument("--tile-size", type=int, default=1024)
    ap.add_argument("--halo", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    import importlib

    import torch

    from geoseg.grid import padded_size

    torch.set_num_threads(args.threads)
    module, attr = args.factory.split(":")
    model = getattr(importlib.import_module(module), attr)().eval()
    side = padded_size(args.tile_size, args.halo)
    x = torch.rand(args.batch_size, 3, side, side)
    times = []
    with torch.inference_mode():
        model(x[:1])  # warm-up: allocator, kernels
        for _ in range(args.batches):
            t = time.perf_counter()
            logits = model(x)
            logits.argmax(dim=1).to(torch.uint8)  # the actor's own per-pixel step, for parity
            times.append(time.perf_counter() - t)
    per_batch = statistics.median(times)
    out = {
        "threads": args.threads,
        "batch_size": args.batch_size,
        "padded_side": side,
        "batch_seconds": [round(t, 3) for t in times],
        "median_batch_s": round(per_batch, 3),
        "mpx_per_s": round(args.batch_size * args.tile_size**2 / per_batch / 1e6, 4),
    }
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
