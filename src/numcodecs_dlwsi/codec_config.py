"""The codec configuration stored in array metadata: quality, model id and weights hash,
an optional ``target_ssim`` for rate-controlled encoding and ``refine``, the latent
refinement steps of encoding (both encoder-only: readers ignore them).

Shared by the numcodecs and zarr-python 3 adapters. A configuration written into an
array pins the exact weights; one given by a user with only a quality is completed
from the installed default model. With ``target_ssim`` the quality is the highest rung
the encoder may use, and each chunk names its own rung.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .bitstream import MODEL_ID_PATTERN
from .latent_refinement import MAX_STEPS
from .model_store import ModelRef, default_model, default_quality, resolve

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CodecConfig:
    quality: int
    model: str
    model_hash: str
    target_ssim: float | None = None
    refine: int = 0

    @classmethod
    def create(cls, quality: int | None = None, model: str | None = None,
               model_hash: str | None = None, target_ssim: float | None = None,
               refine: int = 0) -> CodecConfig:
        """Validate user or metadata values; fill what is missing from installed models."""
        if isinstance(refine, bool) or not isinstance(refine, int) or \
                not 0 <= refine <= MAX_STEPS:
            raise ValueError(f"dlwsi refine must be an integer number of steps in "
                             f"0..{MAX_STEPS}, got {refine!r}")
        if target_ssim is not None and (isinstance(target_ssim, bool) or
                                        not isinstance(target_ssim, int | float) or
                                        not 0.0 < target_ssim < 1.0):
            raise ValueError(f"dlwsi target_ssim must be a number between 0 and 1, got "
                             f"{target_ssim!r}")
        target_ssim = None if target_ssim is None else float(target_ssim)
        if quality is not None and (isinstance(quality, bool) or not isinstance(quality, int)
                                    or not 1 <= quality <= 255):
            raise ValueError(f"dlwsi quality must be an integer in 1..255, got {quality!r}")
        if model is not None and (not isinstance(model, str) or
                                  not MODEL_ID_PATTERN.fullmatch(model)):
            raise ValueError(f"dlwsi model must be a model id like 'he-mshl-v1', got {model!r}")
        if model_hash is not None and (not isinstance(model_hash, str) or
                                       not _SHA256.fullmatch(model_hash)):
            raise ValueError(f"dlwsi model_hash must be 64 lowercase hex digits, got "
                             f"{model_hash!r}")
        if model_hash is not None and model is not None and quality is not None:
            # Fully pinned (e.g. read from array metadata): checked against the installed
            # weights only when chunks are coded, so metadata stays readable without them.
            return cls(quality, model, model_hash, target_ssim, refine)
        if model_hash is not None:
            raise ValueError("dlwsi model_hash needs model and quality alongside it")
        model = model or default_model()
        quality = default_quality(model) if quality is None else quality
        return cls(quality, model, resolve(model, quality).sha256, target_ssim, refine)

    def as_dict(self) -> dict[str, int | str | float]:
        config: dict[str, int | str | float] = {
            "quality": self.quality, "model": self.model, "model_hash": self.model_hash}
        if self.target_ssim is not None:  # encoding only; stores without it stay as before
            config["target_ssim"] = self.target_ssim
        if self.refine:
            config["refine"] = self.refine
        return config

    def ref(self) -> ModelRef:
        return _pinned(self)


@functools.lru_cache(maxsize=64)
def _pinned(config: CodecConfig) -> ModelRef:
    return resolve(config.model, config.quality, config.model_hash)
