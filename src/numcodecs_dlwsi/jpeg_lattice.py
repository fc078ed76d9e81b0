"""The source's JPEG lattice: decoded pixels snapped back towards what a JPEG could hold.

Most slides reach us as JPEG: every 8x8 block of every colour plane of the scanner's
image is a sum of DCT basis functions with integer multiples of the quantization table as
weights (the "quantization constraint set" of JPEG restoration). A lossy copy of such an
image (ours, or any codec's) lands near that lattice but off it. Knowing the tables, the
decoder moves each DCT coefficient that lies within ``tolerance`` steps of a lattice
point onto it and leaves the others as they are: the coefficients the copy already got
nearly right become exactly the scanner's, without a single extra stored bit. Far
coefficients are left alone, since snapping them would as often move them the wrong way.

This module knows nothing of Zarr or of any codec: it applies a lattice (the tables a
slide reader found in the source's JPEG headers) to uint8 (3, H, W) images whose top-left
pixel is on the source's 8x8 block grid. The arithmetic is specified in docs/reference/codec.md
("The JPEG lattice filter").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .blas_threads import single_threaded_blas

BLOCK = 8
COLORS = ("rgb", "ycbcr")
#: Snap coefficients within this many quantization steps of a lattice point (chosen on
#: training-side H&E tiles JPEG-coded at quality 30, docs/reference/codec.md).
DEFAULT_TOLERANCE = 0.3


def _dct_matrix() -> np.ndarray:
    k = np.arange(BLOCK)[:, None]
    n = np.arange(BLOCK)[None, :]
    matrix = np.cos(math.pi * (2 * n + 1) * k / (2 * BLOCK)) * math.sqrt(2 / BLOCK)
    matrix[0] /= math.sqrt(2)
    return matrix


#: The orthonormal 8-point DCT-II (JPEG's FDCT is this, applied to rows and columns).
DCT = _dct_matrix()

# Fixed point. Every product and partial sum below is an integer under 2**53, which
# float64 holds exactly, so BLAS computes the transforms exactly whatever its summation
# order, blocking or threads: the filter's output is the same on every machine (as the
# integer hyper-synthesis is; a float32 version differed with the BLAS thread count).
#: planes carry 16 fractional bits (libjpeg's SCALEBITS)
PLANE_BITS = 16
#: the 2-D DCT matrix is rounded to 20 fractional bits (entries below 2**-2)
DCT_BITS = 20
#: coefficients enter the inverse transform with 12 fractional bits
INVERSE_BITS = 12

# JFIF's colour transform (ITU-T T.871) with libjpeg's 16-bit constants (jccolor.c and,
# back to RGB, jdcolor.c, each chroma term rounded on its own), so that planes snapped
# exactly onto the scanner's give back the scanner's pixels exactly.
_HALF = 1 << (PLANE_BITS - 1)


def _fixed(x: float) -> int:
    return int(x * (1 << PLANE_BITS) + 0.5)


_TO_YCBCR = np.array([[_fixed(0.29900), _fixed(0.58700), _fixed(0.11400)],
                      [-_fixed(0.16874), -_fixed(0.33126), _fixed(0.50000)],
                      [_fixed(0.50000), -_fixed(0.41869), -_fixed(0.08131)]], dtype=np.int64)


@dataclass(frozen=True)
class JpegLattice:
    """Quantization tables of the three colour planes and how the planes were formed.

    ``tables``: one 64-tuple per plane in natural (row-major) order; ``color``: "rgb"
    (each of R, G, B coded on its own, as Aperio does) or "ycbcr" (JFIF); ``subsampled``:
    the chroma planes were subsampled (then only Y is snapped: the chroma lattice lives on
    a grid the decoder's upsampling has blurred).
    """

    tables: tuple[tuple[int, ...], ...]
    color: str
    subsampled: bool = False
    tolerance: float = DEFAULT_TOLERANCE

    def __post_init__(self) -> None:
        tables = tuple(tuple(int(v) for v in table) for table in self.tables)
        if len(tables) != 3 or any(len(t) != BLOCK * BLOCK for t in tables):
            raise ValueError("a JPEG lattice needs three quantization tables of 64 values")
        if any(not 1 <= v <= 65535 for t in tables for v in t):
            raise ValueError("JPEG quantization steps must be integers in 1..65535")
        if self.color not in COLORS:
            raise ValueError(f"JPEG lattice color must be one of {COLORS}, not {self.color!r}")
        if self.subsampled and self.color != "ycbcr":
            raise ValueError("only YCbCr JPEG has subsampled chroma")
        if isinstance(self.tolerance, bool) or not 0.0 < float(self.tolerance) <= 0.5:
            raise ValueError(f"JPEG lattice tolerance must be in (0, 0.5], not "
                             f"{self.tolerance!r}")
        object.__setattr__(self, "tables", tables)
        object.__setattr__(self, "subsampled", bool(self.subsampled))
        object.__setattr__(self, "tolerance", float(self.tolerance))

    @property
    def snapped_planes(self) -> tuple[int, ...]:
        return (0,) if self.subsampled else (0, 1, 2)

    def as_dict(self) -> dict[str, object]:
        return {"color": self.color, "subsampled": self.subsampled,
                "tolerance": self.tolerance, "tables": [list(t) for t in self.tables]}

    @classmethod
    def from_dict(cls, data: object) -> JpegLattice:
        if not isinstance(data, dict) or set(data) - {"color", "subsampled", "tolerance",
                                                       "tables"}:
            raise ValueError(f"not a JPEG lattice configuration: {data!r}")
        try:
            return cls(tuple(tuple(t) for t in data["tables"]), data["color"],
                       data.get("subsampled", False),
                       data.get("tolerance", DEFAULT_TOLERANCE))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a JPEG lattice configuration ({exc}): {data!r}") from None


def _planes(image: np.ndarray, color: str) -> np.ndarray:
    """(3, H, W) planes at 2**PLANE_BITS, level-shifted by 128 (as JPEG's FDCT input
    is), YCbCr by JFIF's transform unrounded: integers, held exactly in float64."""
    if color == "rgb":
        return (image.astype(np.float64) - 128.0) * 2.0**PLANE_BITS
    planes = np.einsum("ij,jhw->ihw", _TO_YCBCR.astype(np.float64), image.astype(np.float64))
    planes[0] -= 128.0 * 2.0**PLANE_BITS  # Cb and Cr come out level-shifted already
    return planes


def _pixels(planes: np.ndarray, color: str) -> np.ndarray:
    """uint8 RGB from level-shifted planes at 2**PLANE_BITS: each plane rounded (half up)
    and clipped to 0..255, as a JPEG decoder's IDCT output is, then, for YCbCr,
    libjpeg's integer conversion."""
    planes += _HALF + 128.0 * 2.0**PLANE_BITS
    planes *= 2.0**-PLANE_BITS
    np.floor(planes, out=planes)
    np.clip(planes, 0, 255, out=planes)
    if color == "rgb":
        return planes.astype(np.uint8)
    ints = planes.astype(np.int32)
    y, cb, cr = ints[0], ints[1] - 128, ints[2] - 128
    red = y + ((_fixed(1.40200) * cr + _HALF) >> PLANE_BITS)
    green = y + ((-_fixed(0.34414) * cb - _fixed(0.71414) * cr + _HALF) >> PLANE_BITS)
    blue = y + ((_fixed(1.77200) * cb + _HALF) >> PLANE_BITS)
    return np.clip(np.stack([red, green, blue]), 0, 255).astype(np.uint8)


def _blocks(plane: np.ndarray) -> np.ndarray:
    """(H, W) -> (blocks, 64): each whole 8x8 block as a row, in raster order."""
    h, w = plane.shape[0] // BLOCK, plane.shape[1] // BLOCK
    return (plane[: h * BLOCK, : w * BLOCK].reshape(h, BLOCK, w, BLOCK).swapaxes(1, 2)
            .reshape(h * w, BLOCK * BLOCK))


def _unblocks(rows: np.ndarray, h: int, w: int) -> np.ndarray:
    """The inverse of :func:`_blocks` for an (h, w) area of whole blocks."""
    return (rows.reshape(h // BLOCK, w // BLOCK, BLOCK, BLOCK).swapaxes(1, 2)
            .reshape(h, w))


#: The 2-D DCT of a block as one product, row-major vec(D B D^T) = (D kron D) vec(B), so
#: all of a plane's blocks transform in one matrix product; rounded to DCT_BITS, as float64
#: integers for BLAS.
DCT_2D = np.rint(np.kron(DCT, DCT) * 2.0**DCT_BITS)
#: 2**(PLANE_BITS + DCT_BITS): the scale of a forward product
_FORWARD_SCALE = 2.0 ** (PLANE_BITS + DCT_BITS)


def _forward(plane: np.ndarray) -> np.ndarray:
    """Exact DCT coefficients (blocks, 64) of a plane's whole blocks, at _FORWARD_SCALE:
    |plane| < 2**24, |DCT_2D| < 2**18, 64 terms: every sum is below 2**48."""
    return _blocks(plane) @ DCT_2D.T


def coefficients(plane: np.ndarray, table: tuple[int, ...]) -> np.ndarray:
    """DCT coefficients (blocks, 64) of each whole 8x8 block of a level-shifted plane (at
    2**PLANE_BITS), in units of the table's steps (natural order): integers, up to the
    decoder's rounding, for a plane a JPEG decoder made with this table."""
    steps = np.asarray(table, dtype=np.float64)
    return _forward(plane) / (_FORWARD_SCALE * steps)  # one IEEE division each: exact-ish,
    # and the same everywhere


def snap(image: np.ndarray, lattice: JpegLattice) -> np.ndarray:
    """uint8 (3, H, W) with every DCT coefficient near the lattice moved onto it.

    The image's top-left pixel must be on the source's block grid; pixels of partial
    blocks at the right and bottom edges pass through unchanged. Bit-identical on every
    machine (docs/reference/codec.md gives the arithmetic).
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"JPEG lattice snapping needs uint8 (3, H, W), got {image.dtype} "
                         f"{image.shape}")
    h, w = (image.shape[1] // BLOCK) * BLOCK, (image.shape[2] // BLOCK) * BLOCK
    if not h or not w:
        return image
    with single_threaded_blas():
        planes = _snapped_planes(image, lattice, h, w)
    out = _pixels(planes, lattice.color)
    # partial edge blocks are never snapped: keep their pixels bit for bit
    out[:, h:, :] = image[:, h:, :]
    out[:, :, w:] = image[:, :, w:]
    return out


def _snapped_planes(image: np.ndarray, lattice: JpegLattice, h: int, w: int) -> np.ndarray:
    planes = _planes(image, lattice.color)
    for p in lattice.snapped_planes:
        steps = np.asarray(lattice.tables[p], dtype=np.float64)
        exact = _forward(planes[p])
        c = exact / (_FORWARD_SCALE * steps)
        nearest = np.rint(c)
        near = np.abs(c - nearest) < lattice.tolerance
        # coefficients at 2**INVERSE_BITS: lattice points exactly, the others rounded
        exact *= 2.0 ** (INVERSE_BITS - PLANE_BITS - DCT_BITS)
        scaled = np.rint(exact, out=exact)
        nearest *= steps * 2.0**INVERSE_BITS
        np.copyto(scaled, nearest, where=near)
        # |scaled| < 2**24 and |DCT_2D| < 2**18, 64 terms: exact below 2**48
        rows = scaled @ DCT_2D
        rows *= 2.0 ** (PLANE_BITS - INVERSE_BITS - DCT_BITS)
        planes[p, :h, :w] = _unblocks(np.rint(rows, out=rows), h, w)
    return planes


def snap_image(image: np.ndarray, lattice: JpegLattice) -> np.ndarray:
    """:func:`snap` for a uint8 image shaped (3, H, W) or (H, W, 3), in its own layout."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] == 3:
        return snap(np.ascontiguousarray(image), lattice)
    if image.ndim == 3 and image.shape[2] == 3:
        chw = np.ascontiguousarray(image.transpose(2, 0, 1))
        return np.ascontiguousarray(snap(chw, lattice).transpose(1, 2, 0))
    raise ValueError(f"JPEG lattice snapping needs an RGB chunk shaped (3, H, W) or "
                     f"(H, W, 3), got shape {image.shape}")


def fit(image: np.ndarray, lattice: JpegLattice, within: float = 0.1) -> float:
    """Share of the snapped planes' nonzero DCT coefficients (at least half a step from
    zero) within ``within`` steps of the lattice: about 1 for pixels a JPEG decoder made
    with these tables, about ``2 * within`` for anything else. Zero coefficients are left
    out: with coarse steps most high frequencies round to zero whatever the image."""
    planes = _planes(image, lattice.color)
    near, counted = 0, 0
    for p in lattice.snapped_planes:
        c = coefficients(planes[p], lattice.tables[p])
        nonzero = np.abs(c) >= 0.5
        near += int(np.count_nonzero(np.abs(c - np.rint(c))[nonzero] < within))
        counted += int(np.count_nonzero(nonzero))
    return near / counted if counted else 0.0
