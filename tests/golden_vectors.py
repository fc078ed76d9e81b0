"""Golden vectors: chunks written by each released model, and what they must decode to.

Stored bytes are forever. ``python tests/golden_vectors.py`` is run once when a model is
released and writes ``tests/golden/<model>-q<quality>.{chunk,json}``; the tests then
check that every future version of the decoder reproduces the latents bit for bit and
the pixels to within the +-1 allowed between devices.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).resolve().parent / "golden"


def synthetic_image(height: int = 96, width: int = 160) -> np.ndarray:
    """A deterministic H&E-coloured test pattern (no shared data is copied into the repo)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    nuclei = np.sin(xx / 3.1) * np.cos(yy / 4.7) + np.sin((xx + yy) / 9.3)
    stroma = 0.5 + 0.5 * np.sin(xx / 17.0 + yy / 23.0)
    r = 215 - 60 * np.clip(nuclei, 0, None) - 25 * stroma
    g = 160 - 80 * np.clip(nuclei, 0, None) + 30 * stroma
    b = 200 - 20 * np.clip(nuclei, 0, None) + 10 * stroma
    return np.rint(np.clip(np.stack([r, g, b]), 0, 255)).astype(np.uint8)


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def write(model: str) -> None:
    from numcodecs_dlwsi import image_codec
    from numcodecs_dlwsi.model_store import qualities, resolve

    GOLDEN.mkdir(exist_ok=True)
    image = synthetic_image()
    for quality in qualities(model):
        ref = resolve(model, quality)
        name = f"{model}-q{quality}"
        chunk = image_codec.encode_batch([image], ref)[0]
        latents = image_codec.decode_latents([chunk], ref)[0]
        pixels = image_codec.decode_batch([chunk], ref)[0]
        (GOLDEN / f"{name}.chunk").write_bytes(chunk)
        np.save(GOLDEN / f"{name}.pixels.npy", pixels)
        (GOLDEN / f"{name}.json").write_text(json.dumps({
            "model": model, "quality": quality, "model_hash": ref.sha256,
            "z_symbols_sha256": digest(latents.z_symbols.astype("<i4")),
            "y_hat_sha256": digest(latents.y_hat.astype("<f4")),
        }, indent=1) + "\n")
        print(f"wrote {name}: {len(chunk)} bytes")


if __name__ == "__main__":
    from numcodecs_dlwsi.model_store import default_model

    write(sys.argv[1] if len(sys.argv) > 1 else default_model())
