"""``ngff-convert check``: decode every stored chunk of every level and locate damage.

Every chunk the converter writes can be checked: dlwsi chunks carry their own CRC, and
the classical codecs are followed by Zarr's ``crc32c`` codec, so a flipped byte is a
decoding error here instead of wrong pixels. A damaged chunk is named by level, chunk
index (row, column in that level's chunk grid) and the object that holds it (the shard,
for a sharded level), and the check goes on past it.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import zarr

from . import one_line
from .store import Output


@dataclass(frozen=True)
class Damage:
    level: str
    chunk: tuple[int, int]  # (row, column) in the level's chunk grid
    key: str  # the object holding the chunk (its shard, when sharded)
    error: str

    def __str__(self) -> str:
        return (f"level {self.level}, chunk {self.chunk[0]},{self.chunk[1]} "
                f"(object {self.key}): {self.error}")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "chunk": list(self.chunk)}


class DamageLog:
    """Damage found by concurrent readers, in one thread-safe list."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.found: list[Damage] = []

    def add(self, damage: Damage) -> None:
        with self._lock:
            self.found.append(damage)

    def sorted(self) -> list[Damage]:
        return sorted(set(self.found), key=lambda d: (int(d.level) if d.level.isdigit()
                                                      else 0, d.level, d.chunk))


def object_key(array: zarr.Array, path: str, chunk: tuple[int, int]) -> str:
    """The store key of the object holding ``chunk`` (row, col) of ``array``."""
    cy, cx = chunk
    if array.shards is not None:
        per_y = array.shards[1] // array.chunks[1]
        per_x = array.shards[2] // array.chunks[2]
        cy, cx = cy // per_y, cx // per_x
    return f"{path}/{array.metadata.encode_chunk_key((0, cy, cx))}"


def stored_chunks(array: zarr.Array, path: str, present: set[str]) -> list[tuple[int, int]]:
    """The chunks of ``array`` whose objects are in ``present`` (every chunk of a stored
    shard: a glass chunk inside one reads as the fill value)."""
    _, h, w = array.shape
    _, ch, cw = array.chunks
    return [(cy, cx) for cy in range(-(-h // ch)) for cx in range(-(-w // cw))
            if object_key(array, path, (cy, cx)) in present]


def read_chunk(array: zarr.Array, chunk: tuple[int, int]) -> np.ndarray:
    _, ch, cw = array.chunks
    cy, cx = chunk
    return array[:, cy * ch:(cy + 1) * ch, cx * cw:(cx + 1) * cw]


def read_region(array: zarr.Array, path: str, y0: int, y1: int, x0: int, x1: int,
                damage: DamageLog) -> tuple[np.ndarray, np.ndarray]:
    """``array[:, y0:y1, x0:x1]`` read chunk by chunk: (pixels, damaged (h, w) bool).
    A chunk that fails to decode is logged in ``damage``; its pixels are left 0."""
    out = np.zeros((array.shape[0], y1 - y0, x1 - x0), array.dtype)
    bad = np.zeros((y1 - y0, x1 - x0), bool)
    _, ch, cw = array.chunks
    for cy in range(y0 // ch, -(-y1 // ch)):
        for cx in range(x0 // cw, -(-x1 // cw)):
            ya, yb = max(y0, cy * ch), min(y1, (cy + 1) * ch)
            xa, xb = max(x0, cx * cw), min(x1, (cx + 1) * cw)
            try:
                out[:, ya - y0:yb - y0, xa - x0:xb - x0] = array[:, ya:yb, xa:xb]
            except Exception as exc:  # noqa: BLE001 - any decoding error is damage
                damage.add(Damage(path, (cy, cx), object_key(array, path, (cy, cx)),
                                  _describe(exc)))
                bad[ya - y0:yb - y0, xa - x0:xb - x0] = True
    return out, bad


def check_store(out: Output, group: zarr.Group, paths: list[str], workers: int | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Decode every stored chunk of the levels ``paths``; what was checked and the
    damage found."""
    arrays = {path: group[path] for path in paths}
    jobs = [(path, chunk) for path in paths
            for chunk in stored_chunks(arrays[path], path, out.keys(f"{path}/"))]
    damage = DamageLog()

    def decode(job: tuple[str, tuple[int, int]]) -> None:
        path, chunk = job
        try:
            read_chunk(arrays[path], chunk)
        except Exception as exc:  # noqa: BLE001 - any decoding error is damage
            damage.add(Damage(path, chunk, object_key(arrays[path], path, chunk),
                              _describe(exc)))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="checking", unit="chunk", leave=True)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for _ in pool.map(decode, jobs):
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    found = damage.sorted()
    return {"store": out.url,
            "levels": [{"path": path, "chunks_checked": sum(p == path for p, _ in jobs),
                        "damaged": sum(d.level == path for d in found)} for path in paths],
            "chunks_checked": len(jobs), "damaged": [d.as_dict() for d in found]}


def _describe(exc: BaseException) -> str:
    """An error on one line, zarr's checksum message said plainly."""
    text = one_line(exc)
    if "Stored and computed checksum do not match" in text:
        # zarr's crc32c (a classical codec's chunk, or a shard's index)
        return "crc32c checksum mismatch: the stored bytes changed after they were written"
    return text
