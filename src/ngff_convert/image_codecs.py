"""imagecodecs' image codecs as Zarr 3 array-to-bytes codecs, found by name.

Stores written with ``--codec jpeg|jpegxl|jpeg2k|avif`` name their serializer
``numcodecs.imagecodecs_<codec>``, Zarr's convention for numcodecs codecs. The package
declares these classes (and imagecodecs' numcodecs codecs) as entry points, so such a
store opens in a fresh process with nothing imported but zarr.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from zarr.codecs.numcodecs import _codecs


class _ImageCodec(_codecs._NumcodecsArrayBytesCodec):
    """Zarr's numcodecs array-to-bytes wrapper, handing the codec contiguous chunks (the
    transpose filter before it passes a strided view, which imagecodecs refuses)."""

    def __init__(self, **codec_config: Any) -> None:
        with warnings.catch_warnings():  # the store names it; no news to the reader
            warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr")
            super().__init__(**codec_config)

    async def _encode_single(self, chunk_data: Any, chunk_spec: Any) -> Any:
        contiguous = np.ascontiguousarray(chunk_data.as_ndarray_like())
        chunk = chunk_spec.prototype.nd_buffer.from_ndarray_like(contiguous)
        return await super()._encode_single(chunk, chunk_spec)


class Jpeg(_ImageCodec, codec_name="imagecodecs_jpeg"):
    pass


class JpegXl(_ImageCodec, codec_name="imagecodecs_jpegxl"):
    pass


class Jpeg2k(_ImageCodec, codec_name="imagecodecs_jpeg2k"):
    pass


class Avif(_ImageCodec, codec_name="imagecodecs_avif"):
    pass


CLASSES = {cls.codec_name: cls for cls in (Jpeg, JpegXl, Jpeg2k, Avif)}
