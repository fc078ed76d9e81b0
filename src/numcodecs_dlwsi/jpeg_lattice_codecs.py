"""The JPEG lattice filter, ``dlwsi_jpeg_lattice``, for Zarr v2 (numcodecs) and v3.

A filter of its own, usable before any lossy codec: decoding snaps a chunk back onto its
JPEG source's lattice (``jpeg_lattice.snap``); encoding is the identity.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numcodecs.abc import Codec
from numcodecs.compat import ensure_ndarray_like, ndarray_copy
from zarr.abc.codec import ArrayArrayCodec
from zarr.core.common import parse_named_configuration

from .jpeg_lattice import DEFAULT_TOLERANCE, JpegLattice, snap_image

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import NDBuffer
    from zarr.core.chunk_grids import ChunkGrid
    from zarr.core.dtype.wrapper import TBaseDType, TBaseScalar, ZDType


class DlwsiJpegLattice(Codec):
    """Filter for chunks of a JPEG-sourced image: decoding snaps the pixels that the
    compressor returns back onto the source's JPEG lattice (``jpeg_lattice.snap``);
    encoding passes chunks through unchanged. Works with any lossy compressor whose
    chunks start on the source's 8x8 block grid and decode to (3, H, W) or (H, W, 3).

    Parameters
    ----------
    color : {"rgb", "ycbcr"}
        How the source JPEG formed its colour planes.
    tables : list of three lists of 64 int
        Quantization tables of the planes, natural (row-major) order.
    subsampled : bool
        The source's chroma planes were subsampled (only Y is snapped).
    tolerance : float
        Coefficients within this many steps of a lattice point are snapped.
    """

    codec_id = "dlwsi_jpeg_lattice"

    def __init__(self, color: str, tables: list, subsampled: bool = False,
                 tolerance: float = DEFAULT_TOLERANCE) -> None:
        self.lattice = JpegLattice.from_dict({"color": color, "tables": tables,
                                              "subsampled": subsampled,
                                              "tolerance": tolerance})

    def encode(self, buf: object) -> object:
        return buf

    def decode(self, buf: object, out: object = None) -> np.ndarray:
        image = snap_image(ensure_ndarray_like(buf), self.lattice)
        return ndarray_copy(image, out) if out is not None else image

    def get_config(self) -> dict:
        return {"id": self.codec_id, **self.lattice.as_dict()}

    def __repr__(self) -> str:
        return (f"DlwsiJpegLattice(color={self.lattice.color!r}, "
                f"subsampled={self.lattice.subsampled})")


@dataclass(frozen=True)
class JpegLatticeCodec(ArrayArrayCodec):
    """Array-to-array codec for JPEG-sourced images: decoding snaps each chunk back onto
    the source's JPEG lattice (``jpeg_lattice.snap``), encoding is the identity. Goes
    before the serializer (any lossy image codec), inside the shard's codecs when sharded,
    with chunks on the source's 8x8 block grid."""

    is_fixed_size = True

    lattice: JpegLattice

    def __init__(self, *, color: str, tables: list, subsampled: bool = False,
                 tolerance: float = DEFAULT_TOLERANCE) -> None:
        object.__setattr__(self, "lattice", JpegLattice.from_dict(
            {"color": color, "tables": tables, "subsampled": subsampled,
             "tolerance": tolerance}))

    @classmethod
    def from_dict(cls, data: dict) -> Self:
        _, configuration = parse_named_configuration(data, "dlwsi_jpeg_lattice")
        return cls(**configuration)

    def to_dict(self) -> dict:
        return {"name": "dlwsi_jpeg_lattice", "configuration": self.lattice.as_dict()}

    def validate(self, *, shape: tuple[int, ...], dtype: ZDType[TBaseDType, TBaseScalar],
                 chunk_grid: ChunkGrid) -> None:
        if dtype.to_native_dtype() != np.dtype(np.uint8):
            raise ValueError(f"dlwsi_jpeg_lattice needs uint8 RGB, not "
                             f"{dtype.to_native_dtype()}")
        chunk_shape = getattr(chunk_grid, "chunk_shape", None)
        if chunk_shape is not None and (len(chunk_shape) != 3 or chunk_shape[0] != 3):
            raise ValueError(f"dlwsi_jpeg_lattice needs chunks shaped (3, H, W), not "
                             f"{tuple(chunk_shape)}")

    async def _decode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> NDBuffer:
        image = await asyncio.to_thread(snap_image, chunk_array.as_numpy_array(), self.lattice)
        return chunk_spec.prototype.nd_buffer.from_numpy_array(image)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec
                             ) -> NDBuffer | None:
        return chunk_array

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        return input_byte_length
