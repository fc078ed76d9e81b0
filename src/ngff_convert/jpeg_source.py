"""Is the slide's level 0 stored as JPEG, and on which lattice? (``--jpeg-lattice``)

Scanners store most slides as JPEG tiles, so the pixels the converter reads are a JPEG
decoder's output: in every 8x8 block of every colour plane, integer multiples of the
quantization table's steps in the DCT domain. Level 0's codec chain gets the
``dlwsi_jpeg_lattice`` filter (found through the codec registries, like every codec here),
whose decoding snaps a lossy copy's near-lattice coefficients back onto that lattice.

The tables are read from the TIFF's JPEG headers, and only trusted after a check on real
pixels: snapping the source itself must leave it (nearly) unchanged, which holds for the
pixels a JPEG decoder made with these tables on this block grid and for little else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: Natural (row-major) position of each zig-zag index, as DQT segments list them.
ZIGZAG = np.array([0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40,
                   48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36,
                   29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61,
                   54, 47, 55, 62, 63])
#: OpenSlide formats whose level 0 is one tiled TIFF page read pixel for pixel, so the
#: page's JPEG block grid is the level's
TIFF_VENDORS = ("aperio", "generic-tiff")
#: TIFF Photometric -> how the JPEG decoder forms RGB (TIFF JPEG has no JFIF/Adobe marker)
PHOTOMETRIC = {2: "rgb", 6: "ycbcr"}
TIFF_JPEG = 7  # TIFF Compression: "new-style" JPEG
_SOF_MARKERS = {0xC0, 0xC1, 0xC2}  # baseline, extended sequential, progressive Huffman
#: Tiles whose headers are compared: a slide whose tiles differ in tables has no one lattice
TILES_CHECKED = 16
#: Snapping the source itself must leave at least this share of its pixel values within
#: one grey level (a JPEG decoder's output: 92-100%, the rest being its integer IDCT's
#: rounding; the same slide off the block grid or coded otherwise: 35-65%)
MIN_CLOSE = 0.85


@dataclass(frozen=True)
class SourceLattice:
    """The ``dlwsi_jpeg_lattice`` configuration found for level 0, or why there is none."""

    config: dict[str, Any] | None
    reason: str  # what was found (or why nothing was), for the log and the store's settings


def _segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, payload) of the JPEG header segments up to the first scan."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG stream (no SOI marker)")
    out, i = [], 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ValueError(f"JPEG header is damaged at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker == 0xD9:
            break
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2 or i + 2 + length > len(data):
            raise ValueError("JPEG header segment runs past the end of the stream")
        out.append((marker, data[i + 4 : i + 2 + length]))
        if marker == 0xDA:
            break
        i += 2 + length
    return out


def _quantization_tables(payload: bytes, tables: dict[int, list[int]]) -> None:
    i = 0
    while i < len(payload):
        precision, slot = payload[i] >> 4, payload[i] & 0x0F
        size = 128 if precision else 64
        raw = payload[i + 1 : i + 1 + size]
        if len(raw) != size or precision > 1 or slot > 3:
            raise ValueError("JPEG DQT segment is malformed")
        values = np.frombuffer(raw, dtype=">u2" if precision else "u1").astype(np.int64)
        natural = np.empty(64, dtype=np.int64)
        natural[ZIGZAG] = values
        tables[slot] = natural.tolist()
        i += 1 + size


def lattice_config(streams: list[bytes], color: str) -> dict[str, Any]:
    """The ``dlwsi_jpeg_lattice`` configuration of a JPEG image from its header bytes.

    ``streams`` are read in order (a TIFF's shared JPEGTables first, then a tile's own
    header), later tables replacing earlier ones; ``color`` is how the decoder forms RGB.
    Raises ValueError naming what makes the JPEG unusable.
    """
    tables: dict[int, list[int]] = {}
    components: list[tuple[int, int, int]] | None = None
    for stream in streams:
        for marker, payload in _segments(stream):
            if marker == 0xDB:
                _quantization_tables(payload, tables)
            elif marker in _SOF_MARKERS:
                if len(payload) < 6 or payload[0] != 8:
                    raise ValueError("only 8-bit JPEG has a lattice we can use")
                count = payload[5]
                if count != 3 or len(payload) < 6 + 3 * count:
                    raise ValueError(f"JPEG with {count} components is not RGB")
                components = [(payload[7 + 3 * k] >> 4, payload[7 + 3 * k] & 15,
                               payload[8 + 3 * k]) for k in range(count)]
            elif 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                raise ValueError(f"JPEG process SOF{marker - 0xC0} has no usable lattice")
    if components is None:
        raise ValueError("JPEG header has no frame (SOF) segment")
    missing = sorted({slot for _, _, slot in components} - set(tables))
    if missing:
        raise ValueError(f"JPEG header lacks quantization table {missing[0]}")
    sampling = [(h, v) for h, v, _ in components]
    subsampled = len(set(sampling)) > 1
    if subsampled and (color != "ycbcr" or sampling[0] != max(sampling)):
        raise ValueError("JPEG with subsampled planes other than YCbCr chroma")
    return {"color": color, "subsampled": subsampled,
            "tables": [tables[slot] for _, _, slot in components]}


def _tile_bytes(handle: Any, page: Any, index: int) -> bytes:
    handle.seek(page.dataoffsets[index])
    return handle.read(page.databytecounts[index])


def level0_page(tif: Any, width: int, height: int) -> Any:
    """The tiled TIFF page that is level 0 (``width`` x ``height``), or None."""
    return next((p for p in tif.pages if p.imagewidth == width and p.imagelength == height
                 and p.is_tiled), None)


def read_lattice(path: str, vendor: str | None, width: int, height: int) -> SourceLattice:
    """The JPEG lattice of a slide's level 0 (``width`` x ``height``) from its headers."""
    if vendor not in TIFF_VENDORS:
        return SourceLattice(None, f"format {vendor or 'unknown'}: JPEG tables not read "
                                   f"(only {', '.join(TIFF_VENDORS)})")
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = level0_page(tif, width, height)
            if page is None:
                return SourceLattice(None, "level 0 is not a tiled TIFF page")
            if page.compression != TIFF_JPEG or page.photometric not in PHOTOMETRIC:
                return SourceLattice(None, f"level 0 is not JPEG (TIFF compression "
                                           f"{int(page.compression)})")
            color = PHOTOMETRIC[int(page.photometric)]
            shared = [page.jpegtables] if page.jpegtables else []
            stored = [i for i, n in enumerate(page.databytecounts) if n]
            if not stored:
                return SourceLattice(None, "level 0 has no stored tiles")
            picks = np.unique(np.linspace(0, len(stored) - 1, TILES_CHECKED).round()
                              ).astype(int)
            configs = [lattice_config([*shared, _tile_bytes(tif.filehandle, page,
                                                             stored[k])], color)
                       for k in picks]
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        return SourceLattice(None, f"JPEG headers unreadable: {' '.join(str(exc).split())}")
    if any(c != configs[0] for c in configs):
        return SourceLattice(None, "level 0's tiles use different quantization tables")
    config = configs[0]
    kind = "RGB" if color == "rgb" else ("YCbCr, chroma subsampled" if config["subsampled"]
                                         else "YCbCr")
    return SourceLattice(config, f"level 0 is JPEG ({kind}, DC step "
                                 f"{config['tables'][0][0]})")


def _unsaturated(source: np.ndarray) -> np.ndarray:
    """(h, w) bool: pixels of whole 8x8 blocks with no value at 0 or 255. A decoder clips
    what its IDCT puts outside 0..255, so such blocks are not on the lattice as stored."""
    _, h, w = source.shape
    hb, wb = h // 8, w // 8
    blocks = source[:, : hb * 8, : wb * 8].reshape(3, hb, 8, wb, 8)
    clipped = ((blocks == 0) | (blocks == 255)).any(axis=(0, 2, 4))
    keep = np.zeros((h, w), bool)
    keep[: hb * 8, : wb * 8] = np.repeat(np.repeat(~clipped, 8, axis=0), 8, axis=1)
    return keep


def close_share(snap_codec: Any, sources: list[np.ndarray]) -> float:
    """Share of the source pixel values (3, h, w each, on the block grid) that the lattice
    filter's decoding moves by at most one grey level, over whole blocks without clipped
    values: the check that the slide's pixels are on the lattice."""
    close = total = 0
    for source in sources:
        snapped = np.asarray(snap_codec.decode(np.ascontiguousarray(source)))
        moved = np.abs(snapped.astype(np.int16) - source.astype(np.int16))
        keep = _unsaturated(source)
        close += int(np.count_nonzero((moved <= 1) & keep))
        total += 3 * int(np.count_nonzero(keep))
    return close / total if total else 0.0
