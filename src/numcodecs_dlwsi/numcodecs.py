"""numcodecs adapter (Zarr v2): the ``dlwsi`` compressor, ``numcodecs.get_codec({"id": "dlwsi"})``.

The other codecs of the package have their own files: ``jpeg_lattice_codecs.py``,
``jpeg_tile_codecs.py``."""

from __future__ import annotations

import numpy as np
from numcodecs.abc import Codec
from numcodecs.compat import ensure_contiguous_ndarray, ensure_ndarray_like, ndarray_copy

from .codec_config import CodecConfig
from .image_codec import decode_batch, encode_batch
from .model_store import qualities


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

    def quality_range(self) -> tuple[int, int]:
        """The lowest and highest quality of this codec's model (its installed rungs)."""
        rungs = qualities(self.model)
        return min(rungs), max(rungs)

    def get_config(self) -> dict:
        return {"id": self.codec_id, **self._config.as_dict()}

    def __repr__(self) -> str:
        return f"Dlwsi(quality={self.quality}, model={self.model!r})"
