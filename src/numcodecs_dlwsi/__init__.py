"""numcodecs-dlwsi: learned compression of whole-slide image chunks for Zarr.

The codec is registered by entry points (``numcodecs.codecs`` and ``zarr.codecs``), so
Zarr readers decode it without importing this package. Direct use::

    from numcodecs_dlwsi import encode, decode
    chunk = encode(tile, quality=4)     # uint8 (3, H, W) or (H, W, 3)
    tile_again = decode(chunk)
"""

from .bitstream import FORMAT_VERSION
from .image_codec import decode, decode_batch, encode, encode_batch
from .model_store import ModelNotAvailableError

__all__ = ["FORMAT_VERSION", "ModelNotAvailableError", "decode", "decode_batch", "encode",
           "encode_batch"]
__version__ = "0.4.0"
