"""The peer: geoai-py's ``geoai.inference.predict_geotiff`` on the same raster with the same network.

Runs under the throw-away peer environment (``bench/scratch/peer-venv``, see ``bench/peer.py``), in
its own process. The U-Net is built as geoseg's benchmark builds it (smp U-Net, ResNet-18 encoder,
3 bands in, 5 classes out) and loaded from the state_dict the harness saved from that model, so
both runs use the very same weights (``weights_digest`` is compared with the model-alone run's).

The call (geoai-py 0.40.1's signature)::

    predict_geotiff(model, input_raster, output_raster, tile_size=512, overlap=64, batch_size=4,
                    input_bands=[1, 2, 3], num_classes=5, output_dtype="uint8", output_nodata=255,
                    postprocess_fn=argmax over classes -> uint8, device="cpu", verbose=False)

with geoai's defaults otherwise (spline blending of the overlapping tiles' logits, its own
preprocessing: float32, / 255 when values exceed 1.5; torch's default thread count = every core).
Timed: the call itself (``call_s``) and the whole process from its start (``process_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from bench.procmon import hwm_kb, process_start_unix


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--state", default=None, help="state_dict saved by torch.save (the U-Net)")
    ap.add_argument(
        "--model", choices=["unet", "trivial"], default="unet", help="trivial: bench/models.py's 1x1 convolution"
    )
    ap.add_argument("--tile-size", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    start = process_start_unix()

    import importlib.metadata

    import numpy as np
    import segmentation_models_pytorch as smp
    import torch
    from geoai.inference import predict_geotiff

    from bench.child_model import state_digest

    if args.model == "trivial":  # the trivial section's network: zero logits from a 1x1 convolution
        from bench.models import trivial_semantic

        model = trivial_semantic()
    else:
        model = smp.Unet("resnet18", encoder_weights=None, in_channels=3, classes=args.classes)
        model.load_state_dict(torch.load(args.state, map_location="cpu"))
    model.eval()

    def argmax(probs: np.ndarray) -> np.ndarray:
        return np.argmax(probs, axis=0).astype(np.uint8)

    t = time.perf_counter()
    predict_geotiff(
        model,
        args.input,
        args.output,
        tile_size=args.tile_size,
        overlap=args.overlap,
        batch_size=args.batch_size,
        input_bands=[1, 2, 3],
        num_classes=args.classes,
        output_dtype="uint8",
        output_nodata=255,
        postprocess_fn=argmax,
        device="cpu",
        verbose=False,
    )
    call_s = time.perf_counter() - t
    import rasterio

    with rasterio.open(args.output) as ds:
        shape = (ds.count, ds.height, ds.width)
        mpx = ds.width * ds.height / 1e6
    out = {
        "geoai_version": importlib.metadata.version("geoai-py"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "call": (
            f"geoai.inference.predict_geotiff(model, input, output, tile_size={args.tile_size}, "
            f"overlap={args.overlap}, batch_size={args.batch_size}, input_bands=[1, 2, 3], "
            f"num_classes={args.classes}, output_dtype='uint8', output_nodata=255, "
            "postprocess_fn=argmax, device='cpu', verbose=False)"
        ),
        "call_s": round(call_s, 3),
        "process_s": round(time.time() - start, 3),
        "megapixels": round(mpx, 3),
        "mpx_per_s_call": round(mpx / call_s, 4),
        "output_shape": shape,
        "weights_digest": state_digest(model),
        "peak_rss_mib": round(hwm_kb(os.getpid()) / 1024, 1),
    }
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
