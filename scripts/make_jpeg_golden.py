#!/usr/bin/env python3
"""Writes the JPEG decoding goldens: the pixels Pillow (libjpeg-turbo, as the official SAM
pipeline reads images) decodes from each JPEG fixture, as a SHA-256 of the RGB (or L) bytes.
tests/bad_input.rs checks that SkinSAM decodes the same bytes. Also writes three small variants
of tests/fixtures/images/ISIC_0024306.jpg (grayscale, progressive, 4:4:4) into
tests/fixtures/images/jpeg/, so that each decoding path is covered.

Run: .venv/bin/python scripts/make_jpeg_golden.py (writes tests/fixtures/golden/jpeg_decode.json)."""
import glob
import hashlib
import json
import os

from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
SOURCE = os.path.join(FIXTURES, "images", "ISIC_0024306.jpg")


def variants():
    out = os.path.join(FIXTURES, "images", "jpeg")
    os.makedirs(out, exist_ok=True)
    rgb = Image.open(SOURCE).convert("RGB")
    made = {
        "gray.jpg": (rgb.convert("L"), {"quality": 90}),
        "progressive.jpg": (rgb, {"quality": 90, "progressive": True}),
        "444.jpg": (rgb, {"quality": 90, "subsampling": 0}),
    }
    for name, (img, opts) in made.items():
        img.save(os.path.join(out, name), "JPEG", **opts)


def main():
    variants()
    files = sorted(glob.glob(os.path.join(FIXTURES, "images", "*.jpg")) + glob.glob(os.path.join(FIXTURES, "images", "jpeg", "*.jpg"))
                   + glob.glob(os.path.join(FIXTURES, "ham_*", "images", "*.jpg")))
    golden = {}
    for f in files:
        img = Image.open(f)
        img.load()
        # Grayscale stays one channel (masks are read so); colour is RGB, as SamPredictor takes it.
        pixels = img if img.mode == "L" else img.convert("RGB")
        golden[os.path.relpath(f, FIXTURES)] = {
            "width": pixels.width, "height": pixels.height, "mode": pixels.mode,
            "sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
        }
    path = os.path.join(FIXTURES, "golden", "jpeg_decode.json")
    with open(path + ".tmp", "w") as fh:
        json.dump({"decoder": f"Pillow {Image.__version__}", "files": golden}, fh, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path} ({len(golden)} files)")


if __name__ == "__main__":
    main()
