"""Rate-distortion table of the installed dlwsi models beside JPEG, JPEG-XL and AVIF.

Same held-out H&E tiles for every codec (train/data.py's validation split). Each
classical codec is swept over its quality setting; for each dlwsi quality the table
shows the bits per pixel each baseline needs to reach the same SSIM (interpolated), and
the ratio dlwsi / baseline. Bits per pixel include every byte of each chunk (header too).

    python benchmarks/rd_table.py --json docs/rd_v1.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import imagecodecs
import numpy as np
from scipy.ndimage import gaussian_filter

from numcodecs_dlwsi import image_codec
from numcodecs_dlwsi.model_store import default_model, qualities, resolve
from numcodecs_dlwsi.train.data import default_data_root, validation_tiles


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over RGB channels (Wang et al. 2004, Gaussian window sigma 1.5)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    scores = []
    for ca, cb in zip(a, b, strict=True):
        mu_a, mu_b = gaussian_filter(ca, 1.5), gaussian_filter(cb, 1.5)
        var_a = gaussian_filter(ca * ca, 1.5) - mu_a**2
        var_b = gaussian_filter(cb * cb, 1.5) - mu_b**2
        cov = gaussian_filter(ca * cb, 1.5) - mu_a * mu_b
        s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
            (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        scores.append(s[5:-5, 5:-5].mean())
    return float(np.mean(scores))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def measure(tiles: np.ndarray, encode, decode) -> dict:  # noqa: ANN001
    bits, psnrs, ssims = 0, [], []
    for tile in tiles:
        blob = encode(tile)
        back = decode(blob)
        bits += 8 * len(blob)
        psnrs.append(psnr(back, tile))
        ssims.append(ssim(back, tile))
    pixels = tiles.shape[0] * tiles.shape[2] * tiles.shape[3]
    return {"bpp": bits / pixels, "psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}


def baselines() -> dict:
    """name -> (settings, encode(setting) -> fn, decode fn); all on (3, H, W) tiles."""
    def hwc(t: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(t.transpose(1, 2, 0))

    def chw(t: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(t.transpose(2, 0, 1))

    codecs = {
        "JPEG": (list(range(10, 100, 5)) + [97],
                 lambda q: lambda t: imagecodecs.jpeg_encode(hwc(t), level=q),
                 lambda b: chw(imagecodecs.jpeg_decode(b))),
        "JPEG-XL": ([8.0, 6.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.2, 1.0, 0.8, 0.6, 0.45, 0.3, 0.2],
                    lambda d: lambda t: imagecodecs.jpegxl_encode(hwc(t), distance=d, effort=7),
                    lambda b: chw(imagecodecs.jpegxl_decode(b))),
    }
    if imagecodecs.AVIF.available:
        codecs["AVIF"] = (list(range(20, 100, 5)) + [97],
                          lambda q: lambda t: imagecodecs.avif_encode(hwc(t), level=q, speed=6),
                          lambda b: chw(imagecodecs.avif_decode(b)))
    return codecs


def bpp_at(curve: list[dict], metric: str, target: float) -> float | None:
    """Bits per pixel a swept codec needs for ``target`` (log-bpp interpolation)."""
    points = sorted((p[metric], p["bpp"]) for p in curve)
    xs, ys = [p[0] for p in points], [np.log(p[1]) for p in points]
    if not xs[0] <= target <= xs[-1]:
        return None
    return float(np.exp(np.interp(target, xs, ys)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model id (default: the installed default)")
    parser.add_argument("--per-image", type=int, default=8, help="256x256 tiles per image")
    parser.add_argument("--data", type=Path, help="shared data folder (default ../shared/data)")
    parser.add_argument("--json", type=Path, help="write all results as JSON here")
    args = parser.parse_args()
    root = args.data or default_data_root()
    if not (root / "he").is_dir():
        print(f"rd_table: no H&E data at {root}", file=sys.stderr)
        return 2
    tiles = validation_tiles(root, size=256, per_image=args.per_image)
    model = args.model or default_model()
    started = time.time()
    results: dict = {"tiles": int(len(tiles)), "model": model, "dlwsi": {}, "baselines": {},
                     "machine": f"{platform.processor() or platform.machine()}"}
    for quality in qualities(model):
        ref = resolve(model, quality)
        point = measure(tiles, lambda t, r=ref: image_codec.encode_batch([t], r)[0],
                        image_codec.decode)
        results["dlwsi"][quality] = dict(point, sha256=ref.sha256)
    for name, (settings, make_encoder, decode) in baselines().items():
        results["baselines"][name] = [dict(measure(tiles, make_encoder(s), decode), setting=s)
                                      for s in settings]
    print(f"{len(tiles)} held-out H&E tiles of 256x256, model {model}")
    header = f"{'codec':<14}{'bpp':>7}{'PSNR':>8}{'SSIM':>8}"
    names = list(results["baselines"])
    print(header + "".join(f"{n + ' bpp@SSIM':>18}{'ratio':>7}" for n in names))
    for quality, point in results["dlwsi"].items():
        line = f"{'dlwsi q' + str(quality):<14}{point['bpp']:>7.3f}{point['psnr']:>8.2f}" \
               f"{point['ssim']:>8.4f}"
        point["baseline_bpp_at_same_ssim"] = {}
        for name in names:
            other = bpp_at(results["baselines"][name], "ssim", point["ssim"])
            point["baseline_bpp_at_same_ssim"][name] = other
            line += f"{other:>18.3f}{point['bpp'] / other:>7.2f}" if other else f"{'-':>18}{'-':>7}"
        print(line)
    for name in names:
        for p in results["baselines"][name]:
            print(f"{name + ' ' + str(p['setting']):<14}{p['bpp']:>7.3f}{p['psnr']:>8.2f}"
                  f"{p['ssim']:>8.4f}")
    print(f"({time.time() - started:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
