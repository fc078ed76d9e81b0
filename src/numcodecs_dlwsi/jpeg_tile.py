"""A scanner's JPEG tile, kept bit for bit: the ``dlwsi_jpeg_tile`` chunk format.

Most slides are stored as JPEG tiles, and every lossy recompression changes pixels a
pathologist may have signed out on. JPEG-XL recompresses a JPEG losslessly: it keeps the
DCT coefficients and codes them better, and the original JPEG file is reconstructed from
it byte for byte (about 0.74 of the bytes on Aperio tiles). A chunk of this format holds
one complete tile (tables merged), as

- a JPEG-XL stream (``jpegxl_encode_jpeg``) that reconstructs the JPEG exactly, or
- the JPEG itself, where JPEG-XL cannot recompress it (progressive or arithmetic-coded
  JPEG, 12-bit samples, damaged markers) or would not give back the same bytes.

Decoding reconstructs the JPEG and decodes it with libjpeg-turbo, so a reader gets the
pixels a JPEG decoder gives from the source tile. Encoding starts from the JPEG, never
from pixels. This module knows nothing of Zarr; ``numcodecs.py`` and ``zarr3.py`` adapt it.
"""

from __future__ import annotations

import numpy as np

#: how the JPEG forms RGB: TIFF JPEG tiles carry no JFIF/Adobe marker, so the decoder is
#: told (TIFF Photometric RGB -> "rgb", YCbCr -> "ycbcr")
COLORSPACES = {"rgb": "RGB", "ycbcr": "YCbCr"}
JPEG_SOI = b"\xff\xd8"
JXL_CODESTREAM = b"\xff\x0a"
JXL_CONTAINER = b"\x00\x00\x00\x0cJXL \r\n\x87\n"


def _imagecodecs():  # noqa: ANN202 - the module
    try:
        import imagecodecs
    except ImportError:  # pragma: no cover - a base dependency
        raise ImportError("dlwsi_jpeg_tile needs imagecodecs (pip install imagecodecs)"
                          ) from None
    return imagecodecs


def check_colorspace(colorspace: str) -> str:
    if colorspace not in COLORSPACES:
        raise ValueError(f"dlwsi_jpeg_tile colorspace must be one of "
                         f"{', '.join(COLORSPACES)}, not {colorspace!r}")
    return colorspace


def is_jpegxl(data: bytes) -> bool:
    return data.startswith((JXL_CODESTREAM, JXL_CONTAINER))


def pack(jpeg: bytes) -> tuple[bytes, bool]:
    """A chunk holding ``jpeg``: (bytes, True) recompressed as JPEG-XL when that gives the
    JPEG back byte for byte, else (``jpeg`` unchanged, False)."""
    if not jpeg.startswith(JPEG_SOI):
        raise ValueError("dlwsi_jpeg_tile stores JPEG streams; this is not one (no SOI "
                         "marker)")
    codecs = _imagecodecs()
    try:
        recompressed = bytes(codecs.jpegxl_encode_jpeg(jpeg))
        if bytes(codecs.jpegxl_decode_jpeg(recompressed)) == jpeg:
            return recompressed, True
    except Exception:  # noqa: BLE001 - libjxl refuses some JPEGs: keep those as they are
        pass
    return jpeg, False


def original_jpeg(data: bytes) -> bytes:
    """The JPEG a chunk holds, byte for byte as the source stored it."""
    data = bytes(data)
    if data.startswith(JPEG_SOI):
        return data
    if not is_jpegxl(data):
        raise ValueError("not a dlwsi_jpeg_tile chunk: neither JPEG-XL nor JPEG")
    try:
        return bytes(_imagecodecs().jpegxl_decode_jpeg(data))
    except Exception as exc:  # noqa: BLE001 - libjxl's own message, on one line
        raise ValueError(f"dlwsi_jpeg_tile chunk is damaged: JPEG-XL stream does not "
                         f"decode ({' '.join(str(exc).split())})") from None


def decode(data: bytes, colorspace: str) -> np.ndarray:
    """uint8 (h, w, 3): the pixels libjpeg-turbo decodes from the chunk's JPEG."""
    jpeg = original_jpeg(data)
    try:
        image = _imagecodecs().jpeg8_decode(jpeg, colorspace=COLORSPACES[colorspace],
                                            outcolorspace="RGB")
    except Exception as exc:  # noqa: BLE001 - libjpeg's own message, on one line
        raise ValueError(f"dlwsi_jpeg_tile chunk's JPEG does not decode as "
                         f"{colorspace}: {' '.join(str(exc).split())}") from None
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"dlwsi_jpeg_tile holds a JPEG of {image.shape} {image.dtype}, "
                         "not 8-bit RGB")
    return image
