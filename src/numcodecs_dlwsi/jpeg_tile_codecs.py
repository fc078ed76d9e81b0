"""A scanner's JPEG tile kept bit for bit, ``dlwsi_jpeg_tile``, for Zarr v2 (numcodecs) and v3.

Adapters over ``jpeg_tile``: chunks are written from the tiles' JPEG bytes, never from
pixels, and decode to the pixels a JPEG decoder gives from the tile.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numcodecs.abc import Codec
from numcodecs.compat import ensure_contiguous_ndarray, ensure_ndarray_like, ndarray_copy
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.common import parse_named_configuration

from . import jpeg_tile

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer
    from zarr.core.chunk_grids import ChunkGrid
    from zarr.core.dtype.wrapper import TBaseDType, TBaseScalar, ZDType


class DlwsiJpegTile(Codec):
    """A scanner's JPEG tile kept bit for bit, recompressed losslessly as JPEG-XL where it
    can be (``jpeg_tile``). Encoding takes the tile's complete JPEG stream (bytes), never
    pixels; decoding gives the pixels a JPEG decoder gives from it, (3, H, W) uint8.

    Parameters
    ----------
    colorspace : {"rgb", "ycbcr"}
        How the JPEG forms RGB (TIFF Photometric RGB or YCbCr).
    """

    codec_id = "dlwsi_jpeg_tile"

    def __init__(self, colorspace: str = "ycbcr") -> None:
        self.colorspace = jpeg_tile.check_colorspace(colorspace)

    def encode(self, buf: object) -> bytes:
        data = ensure_ndarray_like(buf)
        if data.ndim != 1 or data.dtype != np.uint8:
            raise TypeError("dlwsi_jpeg_tile keeps a scanner's JPEG tiles as they are: it "
                            "encodes a tile's JPEG bytes (ngff-convert --level0 transcode), "
                            "not pixels")
        return jpeg_tile.pack(bytes(data))[0]

    def decode(self, buf: object, out: object = None) -> np.ndarray:
        chunk = bytes(ensure_contiguous_ndarray(buf).view(np.uint8))
        image = np.ascontiguousarray(jpeg_tile.decode(chunk, self.colorspace).transpose(2, 0, 1))
        return ndarray_copy(image, out) if out is not None else image

    def jpeg(self, buf: object) -> bytes:
        """The tile's JPEG, byte for byte as the source stored it (tables merged)."""
        return jpeg_tile.original_jpeg(bytes(ensure_contiguous_ndarray(buf).view(np.uint8)))

    def get_config(self) -> dict:
        return {"id": self.codec_id, "colorspace": self.colorspace}

    def __repr__(self) -> str:
        return f"DlwsiJpegTile(colorspace={self.colorspace!r})"


@dataclass(frozen=True)
class JpegTileCodec(ArrayBytesCodec):
    """Array-to-bytes codec of a scanner's JPEG tiles kept bit for bit (``jpeg_tile``):
    decoding gives the pixels a JPEG decoder gives from the tile, in the chunk's layout,
    (3, H, W) or (H, W, 3). Chunks are written from the tiles' JPEG bytes
    (``jpeg_tile.pack``, as ngff-convert does), never from pixels."""

    is_fixed_size = False

    colorspace: str

    def __init__(self, *, colorspace: str = "ycbcr") -> None:
        object.__setattr__(self, "colorspace", jpeg_tile.check_colorspace(colorspace))

    @classmethod
    def from_dict(cls, data: dict) -> Self:
        _, configuration = parse_named_configuration(data, "dlwsi_jpeg_tile",
                                                     require_configuration=False)
        return cls(**(configuration or {}))

    def to_dict(self) -> dict:
        return {"name": "dlwsi_jpeg_tile", "configuration": {"colorspace": self.colorspace}}

    def validate(self, *, shape: tuple[int, ...], dtype: ZDType[TBaseDType, TBaseScalar],
                 chunk_grid: ChunkGrid) -> None:
        if dtype.to_native_dtype() != np.dtype(np.uint8):
            raise ValueError(f"dlwsi_jpeg_tile holds 8-bit RGB, not {dtype.to_native_dtype()}")

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        image = await asyncio.to_thread(jpeg_tile.decode, chunk_bytes.to_bytes(),
                                        self.colorspace)
        if chunk_spec.shape[0] == 3 and chunk_spec.shape[-1] != 3:
            image = np.ascontiguousarray(image.transpose(2, 0, 1))
        if image.shape != tuple(chunk_spec.shape):
            raise ValueError(f"dlwsi_jpeg_tile chunk holds a {image.shape} tile, but the "
                             f"array expects chunks of {tuple(chunk_spec.shape)}")
        return chunk_spec.prototype.nd_buffer.from_numpy_array(image)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer:
        raise TypeError("dlwsi_jpeg_tile keeps a scanner's JPEG tiles as they are: its "
                        "chunks are written from the tiles' JPEG bytes "
                        "(numcodecs_dlwsi.jpeg_tile.pack, ngff-convert --level0 transcode), "
                        "not from pixels")

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError("dlwsi_jpeg_tile output size depends on the tile")
