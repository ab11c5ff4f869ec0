#!/usr/bin/env python3
"""Times the official segment-anything SamPredictor, for BENCHMARKS.md (run by scripts/bench.sh).

Prints one JSON line: set_image and predict (box + point, multimask) times and peak memory.
"""
import argparse
import json
import resource
import statistics
import time

import numpy as np
import torch
from PIL import Image
from segment_anything import SamPredictor

from sam_builders import build


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="vit_b")
    ap.add_argument("--checkpoint")
    ap.add_argument("--image", required=True)
    ap.add_argument("--box", required=True, help="x0,y0,x1,y1")
    ap.add_argument("--point", required=True, help="x,y")
    ap.add_argument("--embed-repeat", type=int, default=3)
    ap.add_argument("--predict-repeat", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--label", default="official", help="the impl field of the JSON line")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sam = build(args.variant, args.checkpoint)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    sam.to(args.device).eval()
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    predictor = SamPredictor(sam)
    image = np.array(Image.open(args.image).convert("RGB"))
    box = np.array([float(v) for v in args.box.split(",")])
    point = np.array([[float(v) for v in args.point.split(",")]])
    embed = []
    with torch.no_grad():
        predictor.set_image(image)  # warm-up
        for _ in range(args.embed_repeat):
            t = time.perf_counter()
            predictor.set_image(image)
            sync()
            embed.append(time.perf_counter() - t)
        # The image encoder alone on the pre-processed image, as SamPredictor.set_torch_image feeds it.
        x = torch.as_tensor(predictor.transform.apply_image(image), device=args.device).permute(2, 0, 1).contiguous()[None]
        x = sam.preprocess(x)
        encoder = []
        for _ in range(args.embed_repeat):
            t = time.perf_counter()
            sam.image_encoder(x)
            sync()
            encoder.append(time.perf_counter() - t)
        predictor.predict(point_coords=point, point_labels=np.array([1]), box=box, multimask_output=True)
        pred = []
        for _ in range(args.predict_repeat):
            t = time.perf_counter()
            predictor.predict(point_coords=point, point_labels=np.array([1]), box=box, multimask_output=True)
            pred.append(time.perf_counter() - t)
    print(json.dumps({
        "impl": args.label,
        "variant": args.variant,
        "precision": "fp32",
        "threads": torch.get_num_threads(),
        "embed_ms": 1e3 * statistics.median(embed),
        "encoder_ms": 1e3 * statistics.median(encoder),
        "predict_ms": 1e3 * statistics.median(pred),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # Device-wide, like skinsam's: the same cudaMemGetInfo reading.
        **({"gpu_used_mb": (lambda f, t: (t - f) / 2**20)(*torch.cuda.mem_get_info())} if cuda else {}),
        "device": args.device,
    }))


if __name__ == "__main__":
    main()
