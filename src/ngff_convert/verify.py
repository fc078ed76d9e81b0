"""``verify``: a converted image against its source slide, level by level."""

from __future__ import annotations

import math
import os
from typing import Any

import dask
import numpy as np
import zarr

from . import ConvertError
from .check import DamageLog, read_region
from .fidelity import in_tissue, ssim_map
from .jpeg_tiles import find_jpeg_tiles
from .options import Options
from .provenance import source_bytes
from .pyramid import Layout, level_shapes, pyramid
from .reading import open_image
from .slide import open_slide, read_rgb
from .store import PROGRESS_KEY
from .tissue import Glass, MaskParams, TissueMask, mask_downsample, thumbnail, tissue_mask
from .transcode import verify_tiles


def verify(source: str, target: str, options: Options | None = None) -> dict[str, Any]:
    """Per-level PSNR/SSIM of the stored image against the source, and sizes.

    The reference for level k is the source's level 0 halved k times with the same 2x2
    mean (glass untouched). ``*_tissue`` numbers cover the tissue mask only (the codec's
    fidelity); ``*_all`` cover every pixel, glass changes included. ``worst_block`` is the
    512² block (in that level's pixels) with the lowest tissue SSIM, among those at least
    a quarter tissue: a mean can hide one badly coded region.
    """
    from skimage.metrics import structural_similarity  # noqa: F401 - fail early if absent

    options = options or Options()
    out, group, version, ms = open_image(target, options.storage_options)
    slide = open_slide(source)
    state = group.attrs.get(PROGRESS_KEY, {})
    mask_params = MaskParams(**state.get("settings", {}).get("mask", {})) \
        if state.get("settings", {}).get("mask") else MaskParams()
    ds = mask_downsample(slide)
    tissue = tissue_mask(thumbnail(slide, ds), ds, mask_params)
    shapes = level_shapes(slide.height, slide.width,
                          int(state.get("settings", {}).get("chunk", 512)))
    paths = [d["path"] for d in ms["datasets"]]
    layout = Layout(512, 4)
    reference = pyramid(slide, layout, Glass.keep, None)
    rows = []
    import dask.array as da

    tasks = []
    damage = DamageLog()
    for k, path in enumerate(paths):
        arr = group[path]
        if k >= len(shapes) or tuple(arr.shape) != shapes[k]:
            raise ConvertError(f"{target}: level {path} has shape {tuple(arr.shape)}, the "
                               f"source gives {shapes[k] if k < len(shapes) else 'none'}")
        ref = reference[k]
        tile = layout.chunk
        stats = da.map_blocks(_compare_block, ref, array=arr, path=path, damage=damage,
                              tissue=dask.delayed(tissue, pure=True),
                              step=2**k, tile=tile, dtype=np.float64,
                              name=f"verify-level-{path}-{id(damage)}",
                              chunks=((1,), tuple(-(-n // tile) for n in ref.chunks[1]),
                                      tuple(6 * -(-n // tile) for n in ref.chunks[2])))
        tasks.append(stats)
    if options.progress:
        from tqdm.dask import TqdmCallback

        with TqdmCallback(desc="verifying", unit="task", leave=True):
            results = dask.compute(*tasks, num_workers=options.workers or os.cpu_count())
    else:
        results = dask.compute(*tasks, num_workers=options.workers or os.cpu_count())
    for path, result in zip(paths, results, strict=True):
        blocks = result.reshape(result.shape[1], -1, 6)
        s = blocks.reshape(-1, 6).sum(axis=0)
        stored_bytes, _ = out.size(path)
        arr = group[path]
        rows.append({
            "path": path, "shape": list(arr.shape),
            "psnr_all": _psnr(s[0], s[1]) if s[1] else None,
            "ssim_all": float(s[2] / s[1]) if s[1] else None,
            "psnr_tissue": _psnr(s[3], s[4]) if s[4] else None,
            "ssim_tissue": float(s[5] / s[4]) if s[4] else None,
            "tissue_fraction": float(s[4] / max(s[1], 1)),
            "stored_bytes": stored_bytes, "raw_bytes": int(np.prod(arr.shape)),
            "worst_block": _worst_block(blocks, layout.chunk),
        })
    stored_total, _ = out.size()
    level0_tiles = None
    if (state.get("settings", {}).get("level0") or {}).get("mode") == "transcode":
        tiles = find_jpeg_tiles(slide)
        if isinstance(tiles, str):
            raise ConvertError(f"{target}: level 0 keeps the source's JPEG tiles, but "
                               f"{source}: {tiles}")
        level0_tiles = verify_tiles(out.store, group[paths[0]], paths[0], tiles,
                                    lambda x, y, w, h: read_rgb(slide, x, y, w, h))
    found = damage.sorted()
    for row in rows:
        row["damaged_chunks"] = sum(d.level == row["path"] for d in found)
    return {"store": out.url, "source": source, "ngff": version, "levels": rows,
            "damaged": [d.as_dict() for d in found], "level0_tiles": level0_tiles,
            "stored_bytes": stored_total, "source_bytes": source_bytes(slide.path)}


#: tissue at the edge of glass is too few pixels for a meaningful score
WORST_BLOCK_MIN_TISSUE = 0.25


def _worst_block(blocks: np.ndarray, block: int) -> dict[str, Any] | None:
    """The block (``block``² pixels of one level) with the lowest tissue SSIM, among those
    mostly tissue: where the eye should look first. ``blocks``: (rows, cols, 6) sums."""
    n_tissue, n_all = blocks[..., 4], blocks[..., 1]
    measured = (n_tissue >= WORST_BLOCK_MIN_TISSUE * n_all) & (n_tissue > 0)
    if not measured.any():
        return None
    ssim = np.where(measured, blocks[..., 5] / np.maximum(n_tissue, 1), np.inf)
    row, col = np.unravel_index(int(np.argmin(ssim)), ssim.shape)
    return {"ssim_tissue": float(ssim[row, col]), "y": int(row * block),
            "x": int(col * block), "size": block, "blocks_measured": int(measured.sum())}


def _compare_block(ref: np.ndarray, array: zarr.Array, path: str, damage: DamageLog,
                   tissue: TissueMask, step: int, tile: int,
                   block_info: dict | None = None) -> np.ndarray:
    """Per ``tile``² tile of the block: [sq.err all, n all, ssim sum all, sq.err tissue,
    n tissue, ssim sum tissue] (per pixel, channels averaged), as (1, rows, 6 * cols).
    SSIM is computed tile by tile, which also bounds memory. The stored pixels are read
    chunk by chunk: a damaged chunk is logged in ``damage`` and left out of the sums."""
    assert block_info is not None
    (_, _), (y0, y1), (x0, x1) = block_info[0]["array-location"]
    stored, damaged = read_region(array, path, y0, y1, x0, x1, damage)
    _, h, w = ref.shape
    tissue_pixels = in_tissue(tissue, y0, x0, h, w, step) & ~damaged
    err = ((stored.astype(np.float32) - ref.astype(np.float32)) ** 2).mean(axis=0)
    out = np.zeros((1, -(-h // tile), -(-w // tile), 6), np.float64)
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            ssim = ssim_map(stored[:, ty:ty + tile, tx:tx + tile],
                            ref[:, ty:ty + tile, tx:tx + tile])
            e, t = err[ty:ty + tile, tx:tx + tile], tissue_pixels[ty:ty + tile, tx:tx + tile]
            ok = ~damaged[ty:ty + tile, tx:tx + tile]
            out[0, ty // tile, tx // tile] = [e[ok].sum(), ok.sum(), ssim[ok].sum(),
                                              e[t].sum(), t.sum(), ssim[t].sum()]
    return out.reshape(1, out.shape[1], -1)


def _psnr(sq_err_sum: float, n: float) -> float:
    mse = sq_err_sum / max(n, 1)
    return float("inf") if mse == 0 else float(10 * math.log10(255.0**2 / mse))
