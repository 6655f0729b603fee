"""Host preprocessing of one request (crops, resize, normalisation): `make_crops` against the float path.

    python benchmarks/preprocess.py --preset molmoe-1b --out benchmarks/results/preprocess_molmoe1b_cpu.json

The float path (`float_path_crops`, the reference) turns every view into float32 and normalises it
in several passes over the array. `make_crops` keeps views as uint8 and normalises with one table
lookup per channel. At the high tier this host work is comparable to the fast path's GPU stages, and
every request at that tier pays it. Both paths
must give identical pixels and patch masks: checked here on every image timed and on random sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from envs.latency import full_tier_image, median_ms
from envs.vlm.crops import Crops, _region, load_image, make_crops, tiling_for
from envs.vlm.presets import get_preset


def _float_fit(img: Image.Image, height: int, width: int):
    scale = min(height / img.height, width / img.width)
    h, w = max(1, round(img.height * scale)), max(1, round(img.width * scale))
    resized = np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
    top, left = (height - h) // 2, (width - w) // 2
    out = np.zeros((height, width, 3), dtype=np.float32)
    mask = np.zeros((height, width), dtype=np.float32)
    out[top : top + h, left : left + w] = resized
    mask[top : top + h, left : left + w] = 1.0
    return out, mask, np.array([h / img.height, w / img.width, top, left])


def float_path_crops(image, max_crops: int, cfg) -> Crops:
    """The reference: float32 views, normalised after stacking (the straightforward implementation)."""
    img = load_image(image)
    size, patch = cfg.crop_size, cfg.patch_size
    pixels, mask, placement = _float_fit(img, size, size)
    views, regions = [(pixels, mask)], [_region(placement, 0, 0, size)]
    tiling = tiling_for(img.height, img.width, max_crops, cfg)
    if max_crops > 0:
        margin = cfg.overlap_margin * patch
        window = size - 2 * margin
        big, big_mask, placement = _float_fit(img, tiling[0] * window + 2 * margin, tiling[1] * window + 2 * margin)
        for i in range(tiling[0]):
            for j in range(tiling[1]):
                y, x = i * window, j * window
                views.append((big[y : y + size, x : x + size], big_mask[y : y + size, x : x + size]))
                regions.append(_region(placement, y, x, size))
    pixels = np.stack([v[0] for v in views])
    pixels = (pixels - np.array(cfg.mean, dtype=np.float32)) / np.array(cfg.std, dtype=np.float32)
    masks = np.stack([v[1] for v in views])
    p = cfg.patches_per_side
    patch_mask = masks.reshape(len(views), p, patch, p, patch).mean(axis=(2, 4))
    return Crops(pixels.transpose(0, 3, 1, 2).copy(), patch_mask.astype(np.float32), tiling, np.array(regions))


def assert_same(a: Crops, b: Crops) -> None:
    assert a.pixels.dtype == b.pixels.dtype == np.float32 and np.array_equal(a.pixels, b.pixels)
    assert a.patch_mask.dtype == b.patch_mask.dtype and np.array_equal(a.patch_mask, b.patch_mask)
    assert a.tiling == b.tiling and np.array_equal(a.regions, b.regions)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="molmoe-1b")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--random-images", type=int, default=12, help="extra random sizes checked for equality")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    # the uint8 table path is the per-tile layout's; a Molmo-layout model resizes in float32, as Molmo does
    cfg = dataclasses.replace(get_preset(args.preset).vision, layout="per_tile")
    knobs = get_preset(args.preset).knobs
    rng = np.random.default_rng(0)
    sizes = rng.integers(cfg.crop_size // 3, 4 * cfg.crop_size, size=(args.random_images, 2))
    for h, w in sizes:
        image = (rng.random((int(h), int(w), 3)) * 255).astype(np.uint8)
        for max_crops in knobs.max_crops.values():
            assert_same(make_crops(image, max_crops, cfg), float_path_crops(image, max_crops, cfg))
    image = full_tier_image(cfg.crop_size)
    rows = []
    for tier, max_crops in knobs.max_crops.items():
        assert_same(make_crops(image, max_crops, cfg), float_path_crops(image, max_crops, cfg))
        old = median_ms(lambda m=max_crops: float_path_crops(image, m, cfg), repeats=args.repeats, warmup=1)
        new = median_ms(lambda m=max_crops: make_crops(image, m, cfg), repeats=args.repeats, warmup=1)
        views = make_crops(image, max_crops, cfg).n_crops
        rows.append({"tier": tier, "views": views, "float_path_ms": old, "make_crops_ms": new, "speedup": old / new})
    report = {"preset": args.preset, "image": list(image.shape), "repeats": args.repeats,
              "machine": f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)",
              "identical_on": f"{args.random_images} random sizes x {len(knobs.max_crops)} tiers + the timed image",
              "date": time.strftime("%Y-%m-%d"), "tiers": rows}  # fmt: skip
    print(f"{args.preset}, image {image.shape[1]} x {image.shape[0]}, median of {args.repeats}; pixels identical")
    print("| tier | views | float path ms | make_crops ms | speedup |\n|---|---|---|---|---|")
    for r in rows:
        old, new = r["float_path_ms"], r["make_crops_ms"]
        print(f"| {r['tier']} | {r['views']} | {old:.2f} | {new:.2f} | {r['speedup']:.2f}x |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
