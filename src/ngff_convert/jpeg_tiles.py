"""Level 0's JPEG tiles, as the slide file stores them (for a zero-loss level 0).

Aperio SVS and generic tiled TIFF keep level 0 as one tiled TIFF page of JPEG tiles whose
shared tables sit in the page's JPEGTables tag. A tile's complete JPEG is the tile with
those tables merged in, which is what a JPEG decoder (OpenSlide's included) decodes, and
what ``dlwsi_jpeg_tile`` keeps bit for bit. A DICOM WSI (VL Whole Slide Microscopy, JPEG
baseline, ``TILED_FULL``) keeps each tile as one complete JPEG frame of an encapsulated
pixel data element, in raster order.
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
    if info.vendor == "dicom":
        return _dicom_tiles(info)
    if info.vendor not in TIFF_VENDORS:
        return (f"format {info.vendor or 'unknown'}: level 0's JPEG tiles are read from "
                f"{', '.join(TIFF_VENDORS)} and DICOM files only")
    return _tiff_tiles(info)


def _tiff_tiles(info: SlideInfo) -> JpegTiles | str:
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


#: DICOM transfer syntax of JPEG baseline (8-bit, Huffman), the JPEG that libjxl takes
DICOM_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
DICOM_PHOTOMETRIC = {"RGB": "rgb", "YBR_FULL": "ycbcr", "YBR_FULL_422": "ycbcr"}
_ITEM, _END = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"


def _dicom_tiles(info: SlideInfo) -> JpegTiles | str:
    """The JPEG frames of a DICOM WSI's level-0 instance (the given file, or the one of
    its series in the same folder whose total pixel matrix is level 0)."""
    try:
        import pydicom
    except ImportError:
        return "reading DICOM frames needs pydicom (pip install 'numcodecs-dlwsi[convert]')"
    from pathlib import Path

    given = Path(info.path)
    candidates = [given] + sorted(p for p in given.parent.iterdir()
                                  if p.is_file() and p != given)
    reason = "no instance of the series holds level 0"
    for path in candidates:
        try:
            with path.open("rb") as handle:
                ds = pydicom.dcmread(handle, stop_before_pixels=True)
                if (ds.get("TotalPixelMatrixColumns"), ds.get("TotalPixelMatrixRows")) != (
                        info.width, info.height) or "VOLUME" not in (ds.get("ImageType") or []):
                    continue
                reason = _dicom_unusable(ds)
                if reason:
                    return reason
                fragments = _fragments(handle)
        except (OSError, ValueError, pydicom.errors.InvalidDicomError) as exc:
            if path == given:
                return f"level 0's DICOM frames are unreadable: {' '.join(str(exc).split())}"
            continue
        frames = int(ds.get("NumberOfFrames", 1))
        if len(fragments) != frames:
            return (f"level 0's {frames} DICOM frames are in {len(fragments)} fragments "
                    "(one fragment per frame is supported)")
        tiles = JpegTiles(path=str(path), width=info.width, height=info.height,
                          tile=int(ds.Columns),
                          colorspace=DICOM_PHOTOMETRIC[ds.PhotometricInterpretation],
                          offsets=tuple(o for o, _ in fragments),
                          counts=tuple(n for _, n in fragments), tables=b"")
        if frames != tiles.rows * tiles.columns:
            return (f"level 0 has {frames} frames for a grid of {tiles.rows}x"
                    f"{tiles.columns} tiles (one focal plane and optical path is supported)")
        return tiles
    return reason


def _dicom_unusable(ds: Any) -> str | None:
    """Why a level-0 DICOM instance's frames cannot be kept as they are (None: they can)."""
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if syntax != DICOM_JPEG_BASELINE:
        return f"level 0 is not JPEG baseline (DICOM transfer syntax {syntax or 'unknown'})"
    if ds.get("DimensionOrganizationType", "TILED_FULL") != "TILED_FULL":
        return (f"level 0's frames are {ds.get('DimensionOrganizationType')} "
                "(TILED_FULL, in raster order, is supported)")
    if ds.Rows != ds.Columns:
        return f"level 0's frames are not square ({ds.Columns}x{ds.Rows})"
    if ds.get("PhotometricInterpretation") not in DICOM_PHOTOMETRIC:
        return f"level 0's photometric interpretation is {ds.get('PhotometricInterpretation')}"
    return None


def _fragments(handle: Any) -> list[tuple[int, int]]:
    """(offset, length) of each fragment of the encapsulated pixel data that starts at the
    handle's position (its element header, explicit VR little endian); the basic offset
    table item is skipped."""
    header = handle.read(12)
    if header[:4] != b"\xe0\x7f\x10\x00" or header[8:12] != b"\xff\xff\xff\xff":
        raise ValueError("pixel data is not encapsulated")
    fragments: list[tuple[int, int]] = []
    first = True
    while True:
        item = handle.read(8)
        if len(item) < 8 or item[:4] == _END:
            break
        if item[:4] != _ITEM:
            raise ValueError("encapsulated pixel data is damaged (no item tag)")
        length = int.from_bytes(item[4:], "little")
        if not first:
            fragments.append((handle.tell(), length))
        first = False
        handle.seek(length, 1)
    return fragments
