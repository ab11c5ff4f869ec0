#!/usr/bin/env python3
"""Golden outputs from the official `segment-anything` package, for the Rust parity checks.

Builds a SAM variant with random weights (fixed seed), saves its state_dict with torch.save (the
official checkpoint format), runs the official SamPredictor on fixed images and prompts, and writes:

  OUT/sam_<variant>.pth          the checkpoint
  OUT/manifest.json              images, prompts and which tensors hold each case's outputs
  OUT/<image>.golden.safetensors  resized input, embedding, low-res logits (every 4th pixel per
                                  axis, to keep the files small), IoU predictions, masks (bit-packed)

With --checkpoint (a .safetensors file) it runs those weights instead, and the manifest points
at that file (the shipped default model: its golden outputs are committed, its weights are
models/skinsam_tiny.safetensors).

Usage:
  .venv/bin/python scripts/make_golden.py --variant tiny --out tests/fixtures/golden   (committed)
  .venv/bin/python scripts/make_golden.py --variant skinsam_tiny \
      --checkpoint models/skinsam_tiny.safetensors --out tests/fixtures/golden_skinsam_tiny   (committed)
  .venv/bin/python scripts/make_golden.py --variant vit_b --out /tmp/golden-vit_b      (by hand)
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file
from segment_anything import SamPredictor

from sam_builders import VARIANTS, build

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGES = os.path.join(HERE, "..", "tests", "fixtures", "images")
# (file, mask file): one 200x150 copy from the shared HAM10000 set, one 600x450 original.
FIXTURES = [
    ("ISIC_0024306.png", "ISIC_0024306_segmentation.png"),
    ("ISIC_0024311.png", "ISIC_0024311_segmentation.png"),
]
SUBSAMPLE = 4


def randomise(sam):
    """Default init leaves position embeddings, relative position tables and norms at constants,
    which would hide mistakes there: give every tensor random values."""
    with torch.no_grad():
        for name, t in sam.state_dict().items():
            if "rel_pos" in name or "pos_embed" in name:
                t.copy_(torch.randn_like(t) * 0.1)
            elif t.ndim == 1 and ("norm" in name or "neck.1" in name or "neck.3" in name
                                  or "upscaling.1" in name or "downscaling.1" in name or "downscaling.4" in name):
                base = 1.0 if name.endswith("weight") else 0.0
                t.copy_(base + torch.randn_like(t) * 0.1)
            elif "output_hypernetworks_mlps" in name and "layers.2" in name:
                # Default init gives logits of about 0.1; real checkpoints give logits of several
                # units. Scale up so the 1e-3 tolerance is a strict check.
                t.mul_(30.0)


def prompts_from_mask(mask, scale):
    """A box around the lesion and a point at its centre of mass, in image pixels."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    box = [float(int(x0 * scale)), float(int(y0 * scale)), float(int(x1 * scale)), float(int(y1 * scale))]
    point = [float(int(xs.mean() * scale)), float(int(ys.mean() * scale))]
    return box, point


def packbits(masks):
    return np.packbits(masks.reshape(masks.shape[0], -1).astype(np.uint8), axis=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="tiny", choices=VARIANTS)
    ap.add_argument("--checkpoint", help="trained weights (.safetensors) instead of random ones")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    sam = build(args.variant)
    os.makedirs(args.out, exist_ok=True)
    if args.checkpoint:
        from safetensors.torch import load_file
        sam.load_state_dict({k: v.float() for k, v in load_file(args.checkpoint).items()}, strict=True)
        ckpt = os.path.relpath(os.path.abspath(args.checkpoint), os.path.abspath(args.out))
    else:
        randomise(sam)
        ckpt = f"sam_{args.variant}.pth"
        torch.save(sam.state_dict(), os.path.join(args.out, ckpt))
    sam.eval()
    predictor = SamPredictor(sam)
    manifest = {"variant": args.variant, "checkpoint": ckpt,
                "images_dir": os.path.relpath(IMAGES, os.path.abspath(args.out)), "seed": args.seed, "subsample": SUBSAMPLE, "images": []}
    for image_file, mask_file in FIXTURES:
        image = np.array(Image.open(os.path.join(IMAGES, image_file)).convert("RGB"))
        gt = np.array(Image.open(os.path.join(IMAGES, mask_file)).convert("L")) > 127
        box, point = prompts_from_mask(gt, image.shape[1] / gt.shape[1])
        h, w = image.shape[:2]
        bg = [float(min(w - 1, box[2] + 5)), float(min(h - 1, box[3] + 5))]
        tensors = {}
        with torch.no_grad():
            predictor.set_image(image)
            tensors["resized"] = predictor.transform.apply_image(image)[::SUBSAMPLE, ::SUBSAMPLE]
            tensors["features"] = predictor.features.cpu().numpy()
        cases = [
            {"name": "box_point", "points": [point + [1]], "box": box, "multimask": True},
            {"name": "box", "points": [], "box": box, "multimask": False},
            {"name": "point", "points": [point + [1]], "box": None, "multimask": True},
            {"name": "two_points", "points": [point + [1], bg + [0]], "box": None, "multimask": True},
            {"name": "none", "points": [], "box": None, "multimask": True},
            {"name": "mask_box", "points": [], "box": box, "multimask": True, "mask_input": "box_point"},
        ]
        best_logits = {}
        for case in cases:
            pts = np.array([p[:2] for p in case["points"]], dtype=np.float64) if case["points"] else None
            labels = np.array([p[2] for p in case["points"]], dtype=np.int64) if case["points"] else None
            bx = np.array(case["box"], dtype=np.float64) if case["box"] else None
            mask_input = None
            if case.get("mask_input"):
                mask_input = best_logits[case["mask_input"]][None]
                tensors[case["name"] + ".mask_input"] = mask_input.astype(np.float32)
            masks, iou, low = predictor.predict(point_coords=pts, point_labels=labels, box=bx,
                                                mask_input=mask_input, multimask_output=case["multimask"])
            best_logits[case["name"]] = low[int(np.argmax(iou))]
            tensors[case["name"] + ".low_res"] = np.ascontiguousarray(low[:, ::SUBSAMPLE, ::SUBSAMPLE]).astype(np.float32)
            tensors[case["name"] + ".iou"] = iou.astype(np.float32)
            tensors[case["name"] + ".masks"] = packbits(masks)
        # Several boxes in one decoder pass (predict_torch), as the batched API does.
        boxes = np.array([box, [box[0] + 3, box[1] + 2, box[2] - 4, box[3] - 3], [0, 0, w / 2, h / 2]], dtype=np.float64)
        with torch.no_grad():
            tb = predictor.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float), image.shape[:2])
            masks, iou, low = predictor.predict_torch(None, None, boxes=tb, multimask_output=True)
        for i in range(len(boxes)):
            name = f"batch{i}"
            cases.append({"name": name, "points": [], "box": [float(v) for v in boxes[i]], "multimask": True, "batch": "boxes"})
            tensors[name + ".low_res"] = np.ascontiguousarray(low[i, :, ::SUBSAMPLE, ::SUBSAMPLE].numpy()).astype(np.float32)
            tensors[name + ".iou"] = iou[i].numpy().astype(np.float32)
            tensors[name + ".masks"] = packbits(masks[i].numpy())
        stem = os.path.splitext(image_file)[0]
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(args.out, stem + ".golden.safetensors"))
        manifest["images"].append({"file": image_file, "golden": stem + ".golden.safetensors", "height": h, "width": w, "cases": cases})
    with open(os.path.join(args.out, "manifest.json.tmp"), "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(os.path.join(args.out, "manifest.json.tmp"), os.path.join(args.out, "manifest.json"))
    print(f"wrote {args.out} ({args.variant}, {len(manifest['images'])} images)")


if __name__ == "__main__":
    main()
