"""Scale: conversion memory and throughput against slide size.

Builds synthetic slides of several sizes (default 12,500², 25,000² and 50,000² pixels)
as tiled, JPEG-compressed pyramidal TIFFs (generic-tiff for OpenSlide), written tile by
tile so no slide ever sits in memory: an elliptical "section" of real H&E tiles (256²
crops of every image in ``../shared/data/he``, placed by a hash of the tile position)
on scanned-looking glass (off-white with a little noise), ~6% tissue. Lower pyramid
levels are the same mosaic, downsampled per source tile.

Each slide is converted by ``ngff-convert`` in a subprocess while the peak resident
memory of its whole process tree is sampled (psutil, every 0.1 s; not ``ru_maxrss``,
which a forked child inherits from this process), and MP/s from the wall time.
``--codec jpeg`` by default (the pipeline alone: reading, tissue mask, pyramid, shards,
writing); ``--codec dlwsi`` adds the learned codec, which only encodes the ~6% of tissue
chunks and so takes minutes, not hours, on the 2-core CPU. Slides are built
in a temporary folder and deleted afterwards::

    nice -n 5 python benchmarks/scale.py --sizes 12500,25000,50000 --json docs/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
TILE = 256
GLASS = np.array([242, 241, 239], np.uint8)
#: Semi-axes of the tissue ellipse (fractions of the slide side): ~6% of the area, a
#: biopsy-sized section. The converter never reads glass-only level-0 chunks, so its
#: work grows with the tissue area and its bookkeeping with the slide area.
AXES = (0.145, 0.13)


def encode_tile(tile: np.ndarray) -> bytes:
    """One 256² tile as the JPEG bytes tifffile itself would store for it."""
    import io

    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, tile, tile=(TILE, TILE), compression="jpeg",
                     compressionargs={"level": 90}, photometric="rgb", metadata=None)
    data = buf.getvalue()
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        start, count = page.dataoffsets[0], page.databytecounts[0]
    return data[start:start + count]


def source_tiles(rng: np.random.Generator, limit: int = 400) -> np.ndarray:
    """(n, 256, 256, 3) real H&E crops with enough tissue, plus one glass tile (last)."""
    from numcodecs_dlwsi.train.data import IMAGE_SUFFIXES, read_image

    tiles = []
    for path in sorted((DATA / "he").rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        image = read_image(path)
        for y in range(0, image.shape[0] - TILE + 1, TILE):
            for x in range(0, image.shape[1] - TILE + 1, TILE):
                tile = image[y:y + TILE, x:x + TILE]
                if (tile.min(axis=2) < 200).mean() > 0.5:  # mostly tissue
                    tiles.append(tile)
    if not tiles:
        raise SystemExit(f"no H&E tiles found under {DATA / 'he'}")
    rng.shuffle(tiles)
    tiles = tiles[:limit]
    glass = np.clip(GLASS[None, None, :].astype(np.int16)
                    + rng.integers(-2, 3, (TILE, TILE, 1)), 0, 255).astype(np.uint8)
    return np.stack([*tiles, np.broadcast_to(glass, (TILE, TILE, 3))])


def layout(n_tiles_y: int, n_tiles_x: int, n_sources: int) -> np.ndarray:
    """Source index per level-0 tile: an ellipse of tissue, glass (index n_sources)."""
    ty, tx = np.mgrid[0:n_tiles_y, 0:n_tiles_x]
    inside = (((ty + 0.5) / n_tiles_y - 0.5) / AXES[0]) ** 2 + (
        ((tx + 0.5) / n_tiles_x - 0.5) / AXES[1]) ** 2 <= 1
    index = (ty * 7919 + tx * 104729 + (ty * tx) % 977) % n_sources
    return np.where(inside, index, n_sources).astype(np.int64)


def downsampled(sources: np.ndarray, k: int) -> np.ndarray:
    """Every source tile box-downsampled by 2**k: (n, 256 >> k, 256 >> k, 3)."""
    f = 2**k
    s = TILE // f
    blocks = sources.reshape(len(sources), s, f, s, f, 3).astype(np.float32)
    return np.rint(blocks.mean(axis=(2, 4))).astype(np.uint8)


def write_slide(path: Path, size: int, sources: np.ndarray) -> dict:
    import tifffile

    n = -(-size // TILE)
    index = layout(n, n, len(sources) - 1)
    levels = []
    k = 0
    while True:
        side = -(-size // 2**k)
        levels.append((k, side))
        if side <= 1024 or TILE >> (k + 1) == 0:
            break
        k += 1
    start = time.perf_counter()
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for k, side in levels:
            pieces = downsampled(sources, k)
            f = 2**k
            nt = -(-side // TILE)

            def tiles(k: int = k, f: int = f, nt: int = nt, pieces: np.ndarray = pieces):
                # tiles are JPEG-encoded once per distinct content (glass, each source
                # tile at level 0) and otherwise one by one, then written as bytes
                s = TILE // f
                glass = len(sources) - 1
                cache: dict[int, bytes] = {}
                for y in range(nt):
                    for x in range(nt):
                        grid = np.full((f, f), glass, np.int64)
                        sub = index[y * f:(y + 1) * f, x * f:(x + 1) * f]
                        grid[:sub.shape[0], :sub.shape[1]] = sub
                        key = int(grid[0, 0]) if f == 1 or (grid == glass).all() else -1
                        if key >= 0 and key in cache:
                            yield cache[key]
                            continue
                        data = encode_tile(np.ascontiguousarray(
                            pieces[grid].transpose(0, 2, 1, 3, 4).reshape(f * s, f * s, 3)))
                        if key >= 0:
                            cache[key] = data
                        yield data

            tif.write(tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(TILE, TILE),
                      compression="jpeg", compressionargs={"level": 90}, photometric="rgb",
                      subfiletype=1 if k else 0, metadata=None)
    return {"levels": len(levels), "file_bytes": path.stat().st_size,
            "tissue_fraction_tiles": float((index < len(sources) - 1).mean()),
            "build_s": round(time.perf_counter() - start, 1)}


def convert(slide: Path, out: Path, codec: str, workers: int) -> dict:
    import psutil

    cmd = [sys.executable, "-m", "ngff_convert", str(slide), str(out), "--codec", codec,
           "--workers", str(workers), "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(proc.pid)
    peak, samples = 0, []
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
        except psutil.Error:
            rss = 0
        peak = max(peak, rss)
        samples.append((round(time.perf_counter() - start, 1), rss >> 20))
        time.sleep(0.1)
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"conversion failed: {stderr[-2000:]}")
    reported = re.search(r"([\d.]+) s, ([\d.]+) MP/s", stdout)
    # RSS over the second half of the run: flat memory means no growth with progress
    half = [r for t, r in samples if t > seconds / 2]
    return {"seconds": round(seconds, 1), "peak_rss_mib": peak >> 20,
            "rss_mib_p50_second_half": int(np.median(half)) if half else None,
            "cli_seconds": float(reported.group(1)) if reported else None,
            "cli_mp_per_s": float(reported.group(2)) if reported else None,
            "summary": stdout.strip().splitlines()[-1] if stdout.strip() else "",
            "rss_trace_mib": samples[:: max(1, len(samples) // 60)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="12500,25000,50000")
    p.add_argument("--codec", default="jpeg")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    sources = source_tiles(rng)
    results = []
    with tempfile.TemporaryDirectory(prefix="dlwsi-scale-", dir=args.work) as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            slide = Path(tmp) / f"synthetic-{size}.tiff"
            built = write_slide(slide, size, sources)
            out = Path(tmp) / f"synthetic-{size}.zarr"
            row = {"size": size, "megapixels": round(size * size / 1e6, 1), **built,
                   "codec": args.codec, **convert(slide, out, args.codec, args.workers)}
            row["mp_per_s_level0"] = round(size * size / 1e6 / row["seconds"], 2)
            row["store_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            print(json.dumps({k: v for k, v in row.items() if k != "rss_trace_mib"}),
                  flush=True)
            results.append(row)
            slide.unlink()
            shutil.rmtree(out)
    summary = {"sources": f"{len(sources) - 1} real H&E tiles of {TILE}² + glass",
               "workers": args.workers, "machine": {"cores": os.cpu_count(),
                                                    "python": platform.python_version()},
               "note": "MP/s counts level-0 pixels over the wall time of the whole command "
                       "(start-up, tissue mask, every level)", "runs": results}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
