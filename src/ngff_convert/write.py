"""Writing the levels: one dask task per block (a shard, when sharded), locally or on a
dask.distributed cluster; ``--resume`` skips the blocks whose objects are all stored."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import dask
import numpy as np
import zarr

from . import ConvertError, one_line
from .codecs import register_image_codecs
from .options import Options
from .pyramid import Layout
from .store import Output
from .tissue import Glass, TissueMask
from .transcode import ZeroLossLevel0

BATCH_SIZE = 16  # chunks per codec call: dlwsi encodes a batch at once


def configure_zarr() -> None:
    """Codec batches and no empty chunks; set once per process (workers included)."""
    zarr.config.set({"codec_pipeline.batch_size": BATCH_SIZE,
                     "array.write_empty_chunks": False})


def write_levels(out: Output, levels: list[Any], arrays: list[zarr.Array], names: list[str],
                 layout: Layout, tissue: TissueMask, options: Options,
                 resuming: bool, log: Callable[[str], None],
                 zero_loss: ZeroLossLevel0 | None = None
                 ) -> tuple[int, int, dict[str, int]]:
    """Store every level, one task per block; returns (blocks written, blocks skipped,
    level 0's tile counts when it keeps the source's tiles)."""
    from dask.optimization import cull

    writes, keys, skipped, done = [], [], 0, []
    for k, (level, array, name) in enumerate(zip(levels, arrays, names, strict=True)):
        before = skipped
        present = out.keys(f"{name}/") if resuming else set()
        frozen = dask.delayed(frozenset(present), pure=True)
        # tasks carry the store and the array's path, not the array: a scheduler or
        # worker unpickling an array would need its codecs registered first
        if k == 0 and zero_loss is not None:
            w = level.map_blocks(write_tiles_block, store=out.store, path=name,
                                 job=dask.delayed(zero_loss, pure=True),
                                 tissue=dask.delayed(tissue, pure=True), present=frozen,
                                 dtype=np.int64,
                                 chunks=((1,), (1,) * len(level.chunks[1]),
                                         (3,) * len(level.chunks[2])),
                                 name=f"write-level-{name}-tiles")
        else:
            w = level.map_blocks(write_block, store=out.store, path=name, dtype=np.int64,
                                 present=frozen, prefix=f"{name}/", chunk=layout.chunk,
                                 chunks=((1,), (1,) * len(level.chunks[1]),
                                         (1,) * len(level.chunks[2])),
                                 name=f"write-level-{name}")
        for by in range(len(level.chunks[1])):
            for bx in range(len(level.chunks[2])):
                if resuming and (
                        zero_loss.block_done(array, name, tissue, by, bx, present)
                        if k == 0 and zero_loss is not None else
                        block_done(array, present, name, k, by, bx, layout, tissue,
                                    options.glass)):
                    skipped += 1
                else:
                    keys.append((w.name, 0, by, bx))
        writes.append(w)
        done.append(f"level {name} {skipped - before}/{w.numblocks[1] * w.numblocks[2]}")
    if resuming:
        log(f"found {skipped} blocks already written ({', '.join(done)}); "
            f"{len(keys)} remain")
    counts = np.zeros(3, np.int64)
    if keys:
        graph: dict = {}
        for w in writes:  # the levels share their upstream tasks; keys are unique
            graph.update(dict(w.__dask_graph__()))
        graph, _ = cull(graph, keys)  # resume: only what the missing blocks need
        results = run_graph(graph, keys, options)
        for key, result in zip(keys, results, strict=True):
            if zero_loss is not None and key[0] == writes[0].name:
                counts += np.asarray(result).reshape(3)
    tile_counts = {"transcoded": int(counts[0]), "kept_as_jpeg": int(counts[1]),
                   "not_stored": int(counts[2])}
    return len(keys), skipped, tile_counts


def write_tiles_block(block: np.ndarray, store: Any, path: str, job: ZeroLossLevel0,
                      tissue: TissueMask, present: frozenset[str],
                      block_info: dict | None = None) -> np.ndarray:
    """Level 0 of a zero-loss store: the block's tiles from the source file (the pixel
    block itself is only what the lower levels are computed from)."""
    assert block_info is not None
    (_, _), (y0, _), (x0, _) = block_info[0]["array-location"]
    counts = job.write(store, path, tissue, y0, x0, present)
    return counts.reshape(1, 1, 3)


def run_graph(graph: dict, keys: list, options: Options) -> list:
    if options.scheduler:
        try:
            from distributed import Client, progress
        except ImportError:
            raise ConvertError("--scheduler needs the 'distributed' package") from None
        try:
            client = Client(options.scheduler, timeout="20s")
        except OSError as exc:
            raise ConvertError(f"cannot reach dask scheduler {options.scheduler}: "
                               f"{one_line(exc)}") from None
        with client:
            client.run(configure_zarr)
            futures = client.get(graph, keys, sync=False)
            if options.progress:
                progress(futures)
            return client.gather(futures)
    from dask.threaded import get

    workers = options.workers or os.cpu_count() or 1
    if options.progress:
        from tqdm.dask import TqdmCallback

        with TqdmCallback(desc="converting", unit="task", leave=True):
            return get(graph, keys, num_workers=workers)
    return get(graph, keys, num_workers=workers)


def write_block(block: np.ndarray, store: Any, path: str, present: frozenset[str],
                prefix: str, chunk: int, block_info: dict | None = None) -> np.ndarray:
    """Store one block. A shard is one object, written whole; without sharding, chunks
    that a previous (interrupted) run already stored are left as they are."""
    assert block_info is not None
    configure_zarr()
    register_image_codecs()
    array = zarr.open_array(store, path=path, mode="r+")
    (_, _), (y0, y1), (x0, x1) = block_info[0]["array-location"]
    if array.shards is not None or not present:
        array[:, y0:y1, x0:x1] = block
        return np.ones((1, 1, 1), np.int64)
    encode = array.metadata.encode_chunk_key
    for cy in range(y0, y1, chunk):
        for cx in range(x0, x1, chunk):
            if prefix + encode((0, cy // chunk, cx // chunk)) in present:
                continue
            cy1, cx1 = min(cy + chunk, y1), min(cx + chunk, x1)
            array[:, cy:cy1, cx:cx1] = block[:, cy - y0:cy1 - y0, cx - x0:cx1 - x0]
    return np.ones((1, 1, 1), np.int64)


def block_done(array: zarr.Array, present: set[str], name: str, level: int, by: int,
               bx: int, layout: Layout, tissue: TissueMask, glass: Glass) -> bool:
    """Whether a block's objects are all stored (each object is written atomically)."""
    meta = array.metadata
    if array.shards is not None:
        return f"{name}/{meta.encode_chunk_key((0, by, bx))}" in present
    step = 2**level
    _, h, w = array.shape
    n = layout.chunks_per_block
    for cy in range(by * n, min((by + 1) * n, math.ceil(h / layout.chunk))):
        for cx in range(bx * n, min((bx + 1) * n, math.ceil(w / layout.chunk))):
            if glass is not Glass.keep and not tissue.has_tissue(
                    cy * layout.chunk * step, cx * layout.chunk * step,
                    layout.chunk * step, layout.chunk * step):
                continue  # a glass chunk is never stored
            if f"{name}/{meta.encode_chunk_key((0, cy, cx))}" not in present:
                return False
    return True
