"""Level 0's JPEG tiles, as the slide file stores them (for a zero-loss level 0).

Aperio SVS and generic tiled TIFF keep level 0 as one tiled TIFF page of JPEG tiles whose
shared tables sit in the page's JPEGTables tag. A tile's complete JPEG is the tile with
those tables merged in, which is what a JPEG decoder (OpenSlide's included) decodes, and
what ``dlwsi_jpeg_tile`` keeps bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .jpeg_source import PHOTOMETRIC, TIFF_JPEG, TIFF_VENDORS, level0_page
from .slide import SlideInfo


@dataclass(frozen=True)
class JpegTiles:
    """Where each level-0 tile's JPEG is in the slide file (picklable for workers)."""

    path: str
    width: int
    height: int
    tile: int  # tile side in pixels (square tiles)
    colorspace: str  # "rgb" or "ycbcr": how the JPEG forms RGB
    offsets: tuple[int, ...]  # per tile, raster order
    counts: tuple[int, ...]  # bytes per tile; 0: the tile is not stored
    tables: bytes  # the shared JPEGTables stream, or b""

    @property
    def rows(self) -> int:
        return -(-self.height // self.tile)

    @property
    def columns(self) -> int:
        return -(-self.width // self.tile)

    def jpeg(self, row: int, column: int, handle: Any) -> bytes | None:
        """The complete JPEG of tile (row, column), tables merged; None when not stored."""
        index = row * self.columns + column
        if not self.counts[index]:
            return None
        handle.seek(self.offsets[index])
        return merge_tables(self.tables, handle.read(self.counts[index]))


def merge_tables(tables: bytes, tile: bytes) -> bytes:
    """A TIFF JPEG tile with the page's shared tables inserted after its SOI marker (the
    tables stream's own SOI and EOI dropped), as a stand-alone decoder needs it."""
    if len(tables) < 4 or not tables.startswith(b"\xff\xd8"):
        return tile
    return tile[:2] + tables[2:-2] + tile[2:]


def find_jpeg_tiles(info: SlideInfo) -> JpegTiles | str:
    """Level 0's JPEG tiles, or why the slide has none a zero-loss level 0 can keep."""
    if info.vendor not in TIFF_VENDORS:
        return (f"format {info.vendor or 'unknown'}: level 0's JPEG tiles are read from "
                f"{' and '.join(TIFF_VENDORS)} files only")
    import tifffile

    try:
        with tifffile.TiffFile(info.path) as tif:
            page = level0_page(tif, info.width, info.height)
            if page is None:
                return "level 0 is not a tiled TIFF page"
            if page.compression != TIFF_JPEG or page.photometric not in PHOTOMETRIC:
                return f"level 0 is not JPEG (TIFF compression {int(page.compression)})"
            if page.tilewidth != page.tilelength:
                return f"level 0's tiles are not square ({page.tilewidth}x{page.tilelength})"
            if page.bitspersample != 8:
                return f"level 0 has {page.bitspersample}-bit samples"
            tiles = JpegTiles(
                path=info.path, width=info.width, height=info.height, tile=page.tilewidth,
                colorspace=PHOTOMETRIC[int(page.photometric)],
                offsets=tuple(int(o) for o in page.dataoffsets),
                counts=tuple(int(n) for n in page.databytecounts),
                tables=bytes(page.jpegtables or b""))
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        return f"level 0's tiles are unreadable: {' '.join(str(exc).split())}"
    if len(tiles.offsets) != tiles.rows * tiles.columns:
        return (f"level 0 lists {len(tiles.offsets)} tiles for a grid of "
                f"{tiles.rows}x{tiles.columns}")
    if not any(tiles.counts):
        return "level 0 has no stored tiles"
    return tiles
