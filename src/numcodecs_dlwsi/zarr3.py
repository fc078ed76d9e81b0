"""zarr-python 3 adapter: ``dlwsi`` as an array-to-bytes codec (serializer).

Chunks that zarr hands over together are coded in one batch, so a GPU sees large
batches; the work runs in a thread to keep zarr's event loop free.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.common import parse_named_configuration

from .codec_config import CodecConfig
from .image_codec import decode_batch, encode_batch

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer
    from zarr.core.chunk_grids import ChunkGrid
    from zarr.core.dtype.wrapper import TBaseDType, TBaseScalar, ZDType


@dataclass(frozen=True)
class DlwsiCodec(ArrayBytesCodec):
    """Learned lossy serializer for uint8 RGB chunks shaped (3, H, W) or (H, W, 3)."""

    is_fixed_size = False

    quality: int
    model: str
    model_hash: str
    target_ssim: float | None = None  # rate control (encoding only), see numcodecs.Dlwsi
    refine: int = 0  # latent refinement steps (encoding only), see numcodecs.Dlwsi

    def __init__(self, *, quality: int | None = None, model: str | None = None,
                 model_hash: str | None = None, target_ssim: float | None = None,
                 refine: int = 0) -> None:
        config = CodecConfig.create(quality, model, model_hash, target_ssim, refine)
        object.__setattr__(self, "quality", config.quality)
        object.__setattr__(self, "model", config.model)
        object.__setattr__(self, "model_hash", config.model_hash)
        object.__setattr__(self, "target_ssim", config.target_ssim)
        object.__setattr__(self, "refine", config.refine)

    @classmethod
    def from_dict(cls, data: dict) -> Self:
        _, configuration = parse_named_configuration(data, "dlwsi", require_configuration=False)
        return cls(**(configuration or {}))

    def to_dict(self) -> dict:
        return {"name": "dlwsi", "configuration": self._config().as_dict()}

    def _config(self) -> CodecConfig:
        return CodecConfig(self.quality, self.model, self.model_hash, self.target_ssim,
                           self.refine)

    def validate(self, *, shape: tuple[int, ...], dtype: ZDType[TBaseDType, TBaseScalar],
                 chunk_grid: ChunkGrid) -> None:
        if dtype.to_native_dtype() != np.dtype(np.uint8):
            raise ValueError(f"dlwsi stores uint8 RGB images, not {dtype.to_native_dtype()}")
        chunk_shape = getattr(chunk_grid, "chunk_shape", None)
        if chunk_shape is not None and not (
                len(chunk_shape) == 3 and 3 in (chunk_shape[0], chunk_shape[-1])):
            raise ValueError(f"dlwsi needs chunks shaped (3, H, W) or (H, W, 3), not "
                             f"{tuple(chunk_shape)}")

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer:
        return (await self.encode([(chunk_array, chunk_spec)]))[0]

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return (await self.decode([(chunk_bytes, chunk_spec)]))[0]

    async def encode(self, chunks_and_specs: Iterable[tuple[NDBuffer | None, ArraySpec]]
                     ) -> list[Buffer | None]:
        items = list(chunks_and_specs)
        present = [i for i, (chunk, _) in enumerate(items) if chunk is not None]
        arrays = [np.asarray(items[i][0].as_numpy_array()) for i in present]
        blobs = await asyncio.to_thread(encode_batch, arrays, self._config().ref(),
                                        target_ssim=self.target_ssim, refine=self.refine)
        out: list[Buffer | None] = [None] * len(items)
        for i, blob in zip(present, blobs, strict=True):
            out[i] = items[i][1].prototype.buffer.from_bytes(blob)
        return out

    async def decode(self, chunks_and_specs: Iterable[tuple[Buffer | None, ArraySpec]]
                     ) -> list[NDBuffer | None]:
        items = list(chunks_and_specs)
        present = [i for i, (chunk, _) in enumerate(items) if chunk is not None]
        blobs = [items[i][0].to_bytes() for i in present]
        images = await asyncio.to_thread(decode_batch, blobs, self._config().ref())
        out: list[NDBuffer | None] = [None] * len(items)
        for i, image in zip(present, images, strict=True):
            spec = items[i][1]
            if image.shape != tuple(spec.shape):
                raise ValueError(f"dlwsi chunk decodes to shape {image.shape}, but the array "
                                 f"expects chunks of {tuple(spec.shape)}")
            out[i] = spec.prototype.nd_buffer.from_numpy_array(image)
        return out

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError("dlwsi output size depends on the image")
