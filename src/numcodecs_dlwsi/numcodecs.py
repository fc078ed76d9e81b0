"""numcodecs adapters (Zarr v2): the ``dlwsi`` compressor, the ``dlwsi_jpeg_lattice``
filter and the ``dlwsi_jpeg_tile`` compressor, ``numcodecs.get_codec({"id": "dlwsi"})``."""

from __future__ import annotations

import numpy as np
from numcodecs.abc import Codec
from numcodecs.compat import ensure_contiguous_ndarray, ensure_ndarray_like, ndarray_copy

from . import jpeg_tile
from .codec_config import CodecConfig
from .image_codec import decode_batch, encode_batch
from .jpeg_lattice import DEFAULT_TOLERANCE, JpegLattice, snap_image


class Dlwsi(Codec):
    """Learned lossy codec for uint8 RGB chunks shaped (3, H, W) or (H, W, 3).

    Parameters
    ----------
    quality : int, optional
        Rung of the quality ladder (higher = better quality, more bytes).
    model : str, optional
        Model id; defaults to the installed default model.
    model_hash : str, optional
        SHA-256 of the weights; filled in automatically and stored in array metadata.
    target_ssim : float, optional
        Rate control: code each chunk at the lowest rung, up to ``quality``, whose
        decoded chunk reaches this SSIM over its non-white pixels. Needs SciPy to
        encode; decoding needs nothing more.
    refine : int, optional
        Latent refinement: this many gradient steps per chunk on the model's own
        rate-distortion loss (``latent_refinement``). Smaller chunks at the same quality
        for much slower encoding; needs PyTorch to encode, nothing to decode. 0 (the
        default) encodes with the analysis transform alone.
    """

    codec_id = "dlwsi"

    def __init__(self, quality: int | None = None, model: str | None = None,
                 model_hash: str | None = None, target_ssim: float | None = None,
                 refine: int = 0) -> None:
        config = CodecConfig.create(quality, model, model_hash, target_ssim, refine)
        self.quality, self.model, self.model_hash = config.quality, config.model, \
            config.model_hash
        self.target_ssim, self.refine = config.target_ssim, config.refine
        self._config = config

    def encode(self, buf: object) -> bytes:
        return encode_batch([ensure_ndarray_like(buf)], self._config.ref(),
                            target_ssim=self.target_ssim, refine=self.refine)[0]

    def decode(self, buf: object, out: object = None) -> np.ndarray:
        chunk = ensure_contiguous_ndarray(buf).view(np.uint8)
        image = decode_batch([chunk], self._config.ref())[0]
        return ndarray_copy(image, out) if out is not None else image

    def get_config(self) -> dict:
        return {"id": self.codec_id, **self._config.as_dict()}

    def __repr__(self) -> str:
        return f"Dlwsi(quality={self.quality}, model={self.model!r})"


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
