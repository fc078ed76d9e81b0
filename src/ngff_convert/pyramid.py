"""The dask pyramid: level 0 read from the slide, each level halved from the one above.

Every level is a dask array chunked by the *write block* (a shard for sharded Zarr v3,
``shard`` x ``shard`` chunks otherwise), so there is one task per output shard, and the
graph is a tree: a level-k block depends on 2x2 level-(k-1) blocks only. Memory is
bounded by a few blocks per level and worker, whatever the slide size. Glass handling
happens once, on level 0; lower levels inherit it, so a lower-level chunk is pure fill
exactly when its whole level-0 footprint was dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np

from .slide import WHITE, SlideInfo, read_rgb
from .tissue import Glass, TissueMask, apply_glass


@dataclass(frozen=True)
class Layout:
    """Chunking of every level: ``chunk`` pixels, ``block`` = one write task (a shard)."""

    chunk: int = 512
    chunks_per_block: int = 4

    @property
    def block(self) -> int:
        return self.chunk * self.chunks_per_block


def level_shapes(height: int, width: int, chunk: int) -> list[tuple[int, int, int]]:
    """(3, h, w) of each level: halved (rounding up) until the level fits one chunk."""
    shapes = [(3, height, width)]
    while max(shapes[-1][1:]) > chunk:
        _, h, w = shapes[-1]
        shapes.append((3, math.ceil(h / 2), math.ceil(w / 2)))
    return shapes


def _split(n: int, block: int) -> tuple[int, ...]:
    return tuple(min(block, n - i) for i in range(0, n, block)) or (0,)


def level0(info: SlideInfo, layout: Layout, glass: Glass, tissue: TissueMask | None) -> da.Array:
    """Level 0 as a lazy (3, H, W) uint8 array, glass handled, one task per block."""
    chunks = ((3,), _split(info.height, layout.block), _split(info.width, layout.block))
    # the mask travels as one graph node (not once per task) to distributed workers
    return da.map_blocks(
        _read_block, info=info, glass=glass, tissue=dask.delayed(tissue, pure=True),
        chunk=layout.chunk,
        chunks=chunks, dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8),
        name=f"slide-level0-{glass.value}-{layout.chunk}x{layout.chunks_per_block}",
    )


def _read_block(info: SlideInfo, glass: Glass, tissue: TissueMask | None, chunk: int,
                block_info: dict | None = None) -> np.ndarray:
    assert block_info is not None
    (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
    if glass is not Glass.keep and tissue is not None and not tissue.has_tissue(
            y0, x0, y1 - y0, x1 - x0):
        return np.full((3, y1 - y0, x1 - x0), WHITE, np.uint8)  # glass: never read
    block = read_rgb(info, x0, y0, x1 - x0, y1 - y0)
    if tissue is None:
        return block
    return apply_glass(block, glass, tissue, y0, x0, chunk)


def halve(level: da.Array, block: int) -> da.Array:
    """The next level: 2x2 mean (rounded; white stays exactly white), re-blocked."""
    _, h, w = level.shape
    if h % 2 or w % 2:
        level = da.pad(level, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
    level = level.rechunk((3, block, block))  # blocks even-sized (block is even)
    out_chunks = (level.chunks[0], tuple(c // 2 for c in level.chunks[1]),
                  tuple(c // 2 for c in level.chunks[2]))
    small = level.map_blocks(_mean2x2, chunks=out_chunks, dtype=np.uint8)
    return small.rechunk((3, block, block))


def _mean2x2(block: np.ndarray) -> np.ndarray:
    c, h, w = block.shape
    s = block.reshape(c, h // 2, 2, w // 2, 2).sum(axis=(2, 4), dtype=np.uint16)
    return ((s + 2) // 4).astype(np.uint8)


def pyramid(info: SlideInfo, layout: Layout, glass: Glass, tissue: TissueMask | None,
            level0_layout: Layout | None = None) -> list[da.Array]:
    """All levels, level 0 first, down to one chunk. ``level0_layout``: level 0's own
    blocks and glass grid (a zero-loss level 0 on the scanner's tiles), if not ``layout``."""
    levels = [level0(info, level0_layout or layout, glass, tissue)]
    for _ in level_shapes(info.height, info.width, layout.chunk)[1:]:
        levels.append(halve(levels[-1], layout.block))
    return levels
