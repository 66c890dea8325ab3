"""Reference colour conversions for the Rust colour parity test (tests/attributes_reference.rs).

Usage: python colour_reference.py OUT_DIR   (writes OUT_DIR/colour.json)

sRGB -> CIE Lab (D65) for a grid of sRGB colours plus random ones, and CIEDE2000 for random
Lab pairs including the awkward cases (grey, hue wrap-around, equal colours).

The reference is scikit-image (`skimage.color.rgb2lab`, `deltaE_ciede2000`), an exact
float64 implementation. When scikit-image is not installed it falls back to OpenCV's
`cvtColor(float32, COLOR_RGB2Lab)`, which `scripts/setup --test` always installs but which
approximates the sRGB curve with tables (up to ~0.4 Lab units off in dark colours), so the
test then uses a looser tolerance and skips CIEDE2000. `reference` in the output says which.
"""

import json
import os
import sys

import numpy as np


def colours():
    levels = list(range(0, 256, 15)) + [255]
    grid = np.array([[r, g, b] for r in levels for g in levels for b in levels], dtype=np.uint8)
    rng = np.random.default_rng(20260101)
    rand = rng.integers(0, 256, size=(4000, 3), dtype=np.uint8)
    return np.concatenate([grid, rand])


def lab_pairs():
    rng = np.random.default_rng(7)
    n = 2000
    lab1 = rng.uniform([0.0, -100.0, -110.0], [100.0, 100.0, 100.0], size=(n, 3))
    near = lab1 + rng.normal(0.0, 5.0, size=(n, 3))  # small differences matter most
    far = rng.uniform([0.0, -100.0, -110.0], [100.0, 100.0, 100.0], size=(n, 3))
    lab2 = np.where(rng.random((n, 1)) < 0.5, near, far)
    special = np.array(
        [
            [50, 0, 0, 50, 0, 0],  # equal greys
            [50, 0, 0, 60, 0, 0],  # greys
            [50, 0, 0, 50, 10, 0],  # grey vs chromatic
            [50, 10, -1, 50, 10, 1],  # hue wrap-around near 0/360
            [50, -10, -1, 50, -10, 1],  # hues near 180
            [30, 20, 20, 30, 20, 20],  # equal chromatic
            [60, -30, 40, 55, 35, -40],  # opposite hues
        ],
        dtype=np.float64,
    )
    pairs = np.concatenate([np.concatenate([lab1, lab2], axis=1), special])
    # The Rust side computes in f32 inputs: give both sides the same numbers.
    return pairs.astype(np.float32).astype(np.float64)


def main(out_dir):
    rgb = colours()
    out = {"rgb": rgb.tolist()}
    try:
        from skimage import color

        out["reference"] = "skimage"
        out["lab"] = color.rgb2lab(rgb[None].astype(np.float64) / 255.0)[0].tolist()
        pairs = lab_pairs()
        out["pairs"] = pairs.tolist()
        out["ciede2000"] = color.deltaE_ciede2000(pairs[:, :3], pairs[:, 3:]).tolist()
    except ImportError:
        import cv2

        out["reference"] = "opencv"
        lab = cv2.cvtColor(rgb[None].astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)[0]
        out["lab"] = lab.astype(np.float64).tolist()
        out["pairs"] = []
        out["ciede2000"] = []
    with open(os.path.join(out_dir, "colour.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1])
