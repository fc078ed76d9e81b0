"""A zero-loss level 0: the scanner's own JPEG tiles, recompressed losslessly.

With ``--level0 transcode`` (or by default, when it is not larger than the lossy copy),
level 0 stores each of the source's JPEG tiles as one chunk of the ``dlwsi_jpeg_tile``
codec (found through the registries): JPEG-XL that gives the tile's JPEG back byte for
byte, or the JPEG itself where JPEG-XL cannot take it. The chunk shape is the scanner's
tile; shards hold ``k`` x ``k`` tiles. The objects are written here directly (the codec
encodes from JPEG bytes, never from pixels), in Zarr's sharding format: the chunks, then
the index of (offset, length) pairs and its CRC-32C, each chunk followed by its own
CRC-32C (the ``crc32c`` codec after the tile codec).

Glass: with ``--glass keep`` every tile is stored; otherwise tiles without tissue are not
stored (they read as the fill value, white), the one change to level 0, and every other
tile is kept as scanned, glass within it included.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from . import ConvertError
from .jpeg_tiles import JpegTiles
from .pyramid import Layout
from .tissue import Glass, TissueMask

CODEC_ID = "dlwsi_jpeg_tile"
NO_CHUNK = 2**64 - 1  # a shard index entry for a chunk that is not stored


def tile_codec(colorspace: str) -> Any:
    """The numcodecs ``dlwsi_jpeg_tile`` codec, from the registry."""
    import numcodecs

    return numcodecs.get_codec({"id": CODEC_ID, "colorspace": colorspace})


def tiles_per_block(tile: int, chunk: int, chunks_per_block: int) -> int:
    """Tiles per write block (a shard, when sharded) side: about the other levels'."""
    return max(1, round(chunk * chunks_per_block / tile))


def level0_codecs(tiles: JpegTiles) -> dict[str, Any]:
    return {"filters": None, "compressors": [{"name": "crc32c"}],
            "serializer": {"name": CODEC_ID,
                           "configuration": {"colorspace": tiles.colorspace}}}


def create_level0(group: zarr.Group, name: str, tiles: JpegTiles, per_block: int,
                  sharded: bool) -> zarr.Array:
    side = tiles.tile
    shards = (3, side * per_block, side * per_block) if sharded else None
    return group.create_array(name=name, shape=(3, tiles.height, tiles.width),
                              chunks=(3, side, side), shards=shards, dtype="uint8",
                              fill_value=255, overwrite=True, dimension_names=["c", "y", "x"],
                              config={"write_empty_chunks": False}, **level0_codecs(tiles))


def _crc32c(data: bytes) -> bytes:
    import google_crc32c

    return int(google_crc32c.value(data)).to_bytes(4, "little")


@dataclass(frozen=True)
class PackedTile:
    data: bytes  # the chunk as stored: the codec's bytes and their CRC-32C
    transcoded: bool  # JPEG-XL (else the JPEG itself)


def stored_tile(tiles: JpegTiles, tissue: TissueMask | None, glass: Glass, row: int,
                column: int) -> bool:
    """Whether tile (row, column) is stored (glass tiles are not, unless kept)."""
    if row >= tiles.rows or column >= tiles.columns:
        return False
    if glass is Glass.keep or tissue is None:
        return True
    side = tiles.tile
    return tissue.has_tissue(row * side, column * side, side, side)


def pack_tile(codec: Any, jpeg: bytes) -> PackedTile:
    data = bytes(codec.encode(np.frombuffer(jpeg, np.uint8)))
    return PackedTile(data + _crc32c(data), not data.startswith(b"\xff\xd8"))


def shard_bytes(chunks: list[PackedTile | None], per_shard: int) -> bytes:
    """Zarr's sharding format (index at the end): the chunks in C order, then
    (offset, length) uint64 little-endian per chunk (``NO_CHUNK`` when absent), then the
    index's CRC-32C."""
    index = np.full((1, per_shard, per_shard, 2), NO_CHUNK, "<u8")
    body, offset = [], 0
    for k, chunk in enumerate(chunks):
        if chunk is None:
            continue
        index[0, k // per_shard, k % per_shard] = (offset, len(chunk.data))
        body.append(chunk.data)
        offset += len(chunk.data)
    index_bytes = index.tobytes()
    return b"".join(body) + index_bytes + _crc32c(index_bytes)


def write_block(store: Any, path: str, tiles: JpegTiles, tissue: TissueMask | None,
               glass: Glass, per_block: int, sharded: bool, y0: int, x0: int,
               present: frozenset[str]) -> np.ndarray:
    """Write the level-0 objects of the block of ``per_block`` x ``per_block`` tiles at
    (y0, x0): one shard when ``sharded``, else one object per tile (objects already in
    ``present``, from an interrupted run, are left as they are). Returns [tiles
    transcoded, kept as JPEG, not stored (glass or absent in the source)]."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    array = zarr.open_array(store, path=path, mode="r")
    encode_key = array.metadata.encode_chunk_key
    codec = tile_codec(tiles.colorspace)
    side = tiles.tile
    row0, col0 = y0 // side, x0 // side
    counts = np.zeros(3, np.int64)
    objects: dict[str, bytes] = {}
    packed: list[PackedTile | None] = []
    with open(tiles.path, "rb") as handle:
        for row in range(row0, row0 + per_block):
            for column in range(col0, col0 + per_block):
                key = f"{path}/{encode_key((0, row, column))}"
                if not sharded and key in present:
                    packed.append(None)
                    continue
                jpeg = tiles.jpeg(row, column, handle) \
                    if stored_tile(tiles, tissue, glass, row, column) else None
                if jpeg is None:
                    counts[2] += row < tiles.rows and column < tiles.columns
                    packed.append(None)
                    continue
                packed.append(pack_tile(codec, jpeg))
                counts[0 if packed[-1].transcoded else 1] += 1
                if not sharded:
                    objects[key] = packed[-1].data
    if sharded and any(packed):
        key = f"{path}/{encode_key((0, row0 // per_block, col0 // per_block))}"
        if key not in present:
            objects[key] = shard_bytes(packed, per_block)
    prototype = default_buffer_prototype()
    for key, data in objects.items():
        sync(store.set(key, prototype.buffer.from_bytes(data)))
    return counts


def block_done(array: zarr.Array, path: str, tiles: JpegTiles, tissue: TissueMask | None,
              glass: Glass, per_block: int, by: int, bx: int, present: set[str]) -> bool:
    """--resume: whether block (by, bx)'s objects are all stored."""
    encode_key = array.metadata.encode_chunk_key
    if array.shards is not None:
        return f"{path}/{encode_key((0, by, bx))}" in present
    return all(f"{path}/{encode_key((0, row, column))}" in present
               for row in range(by * per_block, (by + 1) * per_block)
               for column in range(bx * per_block, (bx + 1) * per_block)
               if stored_tile(tiles, tissue, glass, row, column))


# ------------------------------------------------------------------------- estimate


def sample_bits_per_pixel(tiles: JpegTiles, boxes: list[tuple[int, int, int, int]]) -> float:
    """Bits per pixel of the zero-loss level 0 over the tiles that the level-0 boxes
    (y, x, h, w) overlap: the same region the lossy quality was chosen on."""
    side = tiles.tile
    wanted = sorted({(row, column) for y, x, h, w in boxes
                     for row in range(y // side, -(-(y + h) // side))
                     for column in range(x // side, -(-(x + w) // side))})
    codec = tile_codec(tiles.colorspace)
    total = pixels = 0
    with open(tiles.path, "rb") as handle:
        for row, column in wanted:
            jpeg = tiles.jpeg(row, column, handle)
            if jpeg is not None:
                total += len(pack_tile(codec, jpeg).data)
                pixels += side * side
    return 8.0 * total / pixels if pixels else float("inf")


# -------------------------------------------------------------------- read back


class StoredTiles:
    """Level 0's chunks as stored, read one object (a shard, or a tile) at a time and kept
    until another is asked for: walking the tiles in raster order reads each object once."""

    def __init__(self, store: Any, array: zarr.Array, path: str) -> None:
        self.store, self.path = store, path
        self.encode_key = array.metadata.encode_chunk_key
        self.per = array.shards[1] // array.chunks[1] if array.shards else 1
        self._key: str | None = None
        self._data: bytes | None = None

    def _object(self, key: str) -> bytes | None:
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        if key != self._key:
            buffer = sync(self.store.get(key, prototype=default_buffer_prototype()))
            self._key, self._data = key, buffer.to_bytes() if buffer is not None else None
        return self._data

    def chunk(self, row: int, column: int) -> bytes | None:
        """The codec bytes of tile (row, column), its CRC-32C checked; None when the tile
        is not stored (glass). A damaged index or chunk is a one-line ConvertError."""
        per = self.per
        key = f"{self.path}/{self.encode_key((0, row // per, column // per))}"
        data = self._object(key)
        if data is None:
            return None
        if per > 1:
            size = per * per * 16
            index_bytes, crc = data[-size - 4:-4], data[-4:]
            if len(data) < size + 4 or _crc32c(index_bytes) != crc:
                raise ConvertError(f"{key}: the shard index is damaged (CRC-32C mismatch)")
            index = np.frombuffer(index_bytes, "<u8").reshape(per, per, 2)
            offset, length = (int(v) for v in index[row % per, column % per])
            if offset == NO_CHUNK:
                return None
            data = data[offset:offset + length]
        payload, crc = data[:-4], data[-4:]
        if len(data) < 4 or _crc32c(payload) != crc:
            raise ConvertError(f"{key}: level-0 tile {row},{column} is damaged (CRC-32C "
                               "mismatch)")
        return payload

    def raster(self, rows: int, columns: int) -> Iterator[tuple[int, int]]:
        """Every tile, object by object (so that each object is read once)."""
        per = self.per
        for oy in range(-(-rows // per)):
            for ox in range(-(-columns // per)):
                for row in range(oy * per, min((oy + 1) * per, rows)):
                    for column in range(ox * per, min((ox + 1) * per, columns)):
                        yield row, column


def count_tiles(store: Any, array: zarr.Array, path: str, tiles: JpegTiles) -> dict[str, int]:
    """Level 0's tiles as stored: recompressed as JPEG-XL, kept as JPEG, not stored (read
    from the store: what a resumed run reports)."""
    stored = StoredTiles(store, array, path)
    counts = {"transcoded": 0, "kept_as_jpeg": 0, "not_stored": 0}
    for row, column in stored.raster(tiles.rows, tiles.columns):
        data = stored.chunk(row, column)
        kind = "not_stored" if data is None else (
            "kept_as_jpeg" if data.startswith(b"\xff\xd8") else "transcoded")
        counts[kind] += 1
    return counts


# --------------------------------------------------------------------------- choice

LEVEL0_CHOICES = ("auto", "transcode", "lossy")


@dataclass(frozen=True)
class Level0Plan:
    """How level 0 is stored, and why (recorded in the store's settings)."""

    requested: str  # --level0: auto, transcode or lossy
    mode: str  # "transcode" or "lossy"
    reason: str
    zero_loss_bpp: float | None = None  # sample estimates, bits per level-0 pixel
    lossy_bpp: float | None = None

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"requested": self.requested, "mode": self.mode,
                             "reason": self.reason}
        if self.zero_loss_bpp is not None:
            d["zero_loss_bpp"] = round(self.zero_loss_bpp, 4)
        if self.lossy_bpp is not None:
            d["lossy_bpp"] = round(self.lossy_bpp, 4)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Level0Plan:
        return cls(str(d["requested"]), str(d["mode"]), str(d["reason"]),
                   d.get("zero_loss_bpp"), d.get("lossy_bpp"))


def plan_level0(requested: str, tiles: JpegTiles | str, zarr_format: int,
                lossy_bpp: float | None, sample_boxes: list[tuple[int, int, int, int]],
                codec: str, target_reached: bool = True) -> Level0Plan:
    """``--level0``: transcode when asked, lossy when asked, and by default zero loss
    whenever the slide's JPEG tiles allow it and it is not larger than the lossy copy
    measured on the same sample, or no lossy quality reaches the target (with a fixed
    ``--quality`` the lossy copy stands)."""
    if requested not in LEVEL0_CHOICES:
        raise ConvertError(f"--level0 must be one of {', '.join(LEVEL0_CHOICES)}, got "
                           f"{requested!r}")
    if requested == "lossy":
        return Level0Plan(requested, "lossy", f"--level0 lossy: coded with {codec}")
    if isinstance(tiles, str) or zarr_format != 3:
        why = tiles if isinstance(tiles, str) else "NGFF 0.4 (Zarr v2) has no place for it"
        if requested == "transcode":
            raise ConvertError(f"--level0 transcode: {why}; it needs a JPEG-tiled slide "
                               "(Aperio SVS, generic tiled TIFF, DICOM) and --ngff 0.5")
        return Level0Plan(requested, "lossy", f"no zero-loss level 0: {why}")
    if requested == "transcode":
        return Level0Plan(requested, "transcode", "--level0 transcode: the source's JPEG "
                          "tiles, recompressed losslessly")
    if lossy_bpp is None:
        return Level0Plan(requested, "lossy", f"a fixed quality was asked for: coded with "
                          f"{codec}")
    zero = sample_bits_per_pixel(tiles, sample_boxes)
    if not target_reached:
        return Level0Plan(requested, "transcode", f"no {codec} quality reaches the target "
                          f"SSIM, zero loss does ({zero:.2f} bpp on the sample, {codec}'s "
                          f"highest {lossy_bpp:.2f}): the source's JPEG tiles, recompressed "
                          "losslessly", zero, lossy_bpp)
    if zero <= lossy_bpp:
        return Level0Plan(requested, "transcode", f"zero loss ({zero:.2f} bpp on the "
                          f"sample) is not larger than {codec} at the chosen quality "
                          f"({lossy_bpp:.2f} bpp): the source's JPEG tiles, recompressed "
                          "losslessly", zero, lossy_bpp)
    return Level0Plan(requested, "lossy", f"{codec} at the chosen quality "
                      f"({lossy_bpp:.2f} bpp on the sample) is smaller than zero loss "
                      f"({zero:.2f} bpp)", zero, lossy_bpp)


@dataclass(frozen=True)
class ZeroLossLevel0:
    """Everything the conversion needs to keep level 0's tiles (picklable for workers)."""

    tiles: JpegTiles
    per_block: int  # tiles per write block side (a shard, when sharded)
    sharded: bool
    glass: Glass  # keep: every tile; drop: tiles without tissue are not stored

    @property
    def layout(self) -> Layout:
        """Level 0's pyramid blocks: one per write block, on the tile grid."""
        return Layout(self.tiles.tile, self.per_block)

    def create(self, group: zarr.Group, name: str) -> zarr.Array:
        return create_level0(group, name, self.tiles, self.per_block, self.sharded)

    def write(self, store: Any, path: str, tissue: TissueMask | None, y0: int, x0: int,
              present: frozenset[str]) -> np.ndarray:
        return write_block(store, path, self.tiles, tissue, self.glass, self.per_block,
                           self.sharded, y0, x0, present)

    def block_done(self, array: zarr.Array, path: str, tissue: TissueMask | None, by: int,
                   bx: int, present: set[str]) -> bool:
        return block_done(array, path, self.tiles, tissue, self.glass, self.per_block, by,
                          bx, present)


def verify_tiles(store: Any, array: zarr.Array, path: str, tiles: JpegTiles,
                 read_region: Any) -> dict[str, Any]:
    """Every stored level-0 tile against the source: its JPEG byte for byte (SHA-256 of
    the source's tile, tables merged) and its pixels against ``read_region(x, y, w, h)``
    (the slide reader's decode, (3, h, w)). A damaged chunk is listed, not fatal."""
    import hashlib

    codec = tile_codec(tiles.colorspace)
    side = tiles.tile
    stored = StoredTiles(store, array, path)
    report: dict[str, Any] = {"stored": 0, "jpeg_identical": 0, "pixels_identical": 0,
                              "not_stored": 0, "differing": []}
    with open(tiles.path, "rb") as handle:
        for row, column in stored.raster(tiles.rows, tiles.columns):
            try:
                data = stored.chunk(row, column)
            except ConvertError as exc:
                report["differing"].append({"tile": [row, column], "error": str(exc)})
                continue
            if data is None:
                report["not_stored"] += 1
                continue
            report["stored"] += 1
            source = tiles.jpeg(row, column, handle)
            try:
                same_jpeg = source is not None and hashlib.sha256(
                    codec.jpeg(data)).digest() == hashlib.sha256(source).digest()
                pixels = np.asarray(codec.decode(data))
            except ValueError as exc:
                report["differing"].append({"tile": [row, column], "error": str(exc)})
                continue
            y, x = row * side, column * side
            h, w = min(side, tiles.height - y), min(side, tiles.width - x)
            same_pixels = np.array_equal(pixels[:, :h, :w], read_region(x, y, w, h))
            report["jpeg_identical"] += same_jpeg
            report["pixels_identical"] += same_pixels
            if not (same_jpeg and same_pixels):
                report["differing"].append({"tile": [row, column], "jpeg": same_jpeg,
                                            "pixels": same_pixels})
    return report
